"""``workers`` settings and the supervisor's refusals, in this process (the servers: tests/system/test_workers.py)."""

from __future__ import annotations

import socket

import pytest

from alignpro.cli.main import main
from alignpro.errors import ConfigError
from alignpro.server.workers import Supervisor
from alignpro.settings import Settings, load_settings

OPENAI = {"up": {"kind": "openai", "urls": ["http://127.0.0.1:9/v1"], "model": "m"}}
ALIASES = {"plain": {"engine": "up", "prompter": {"mode": "off"}}}


def test_more_than_one_worker_refuses_an_in_process_engine() -> None:
    """The default (embedded) engine would be loaded once per worker: refused, with what to do instead."""
    with pytest.raises(ConfigError, match=r"embedded.* in-process .* workers=1"):
        load_settings(workers=2)
    assert load_settings(workers=1).workers == 1
    assert load_settings(workers=2, engines=OPENAI, aliases=ALIASES).workers == 2


def test_serve_workers_flag_is_checked_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "2"]) != 0
    assert "workers=2 needs openai engines only" in capsys.readouterr().err


def test_a_port_in_use_is_a_startup_failure() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = Settings(engines=OPENAI, aliases=ALIASES, workers=2, port=port)
        assert Supervisor(settings).run() == 3
