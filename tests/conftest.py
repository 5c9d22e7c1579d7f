"""Shared fixtures: the prepared embedded model, and real gateway processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server started as a subprocess, waited for on a health URL, stopped by its process id."""

    def __init__(
        self, args: list[str], health_url: str, env: dict[str, str] | None = None, log: Path | None = None
    ):
        self.args = args
        self.health_url = health_url
        self.env = {**os.environ, **(env or {})}
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> ServerProcess:
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[:4]} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.health_url, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.health_url} did not come up in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_gateway(
    tmp: Path, config: str | None = None, env: dict[str, str] | None = None
) -> tuple[ServerProcess, str]:
    """``alignpro serve`` on a free port; returns the process and its base URL (no /v1)."""
    port = free_port()
    args = [sys.executable, "-m", "alignpro.cli.main", "serve", "--port", str(port)]
    if config is not None:
        path = tmp / f"gateway-{port}.yaml"
        path.write_text(config)
        args += ["--config", str(path)]
    url = f"http://127.0.0.1:{port}"
    server = ServerProcess(args, f"{url}/health", env=env, log=tmp / f"gateway-{port}.log").start()
    return server, url


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The embedded SmolLM2 as a safetensors folder (converted once, then reused)."""
    from alignpro import models

    return models.prepare()


@pytest.fixture(scope="session")
def gateway_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real gateway process with the default settings (embedded model in-process)."""
    server, url = start_gateway(tmp_path_factory.mktemp("gateway"))
    # /health answers before the model is loaded; wait for /ready so tests do not time out on the first call.
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/ready", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"gateway not ready:\n{server.log_tail()}")
        time.sleep(0.5)
    yield url
    server.stop()
