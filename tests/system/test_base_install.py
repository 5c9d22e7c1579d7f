"""The base install serves: ``pip install .`` with no extras has no numpy, torch nor transformers, and the gateway
imports, starts and answers through a ``reference``-mode alias all the same.

The prompter's output validator embeds text with MiniLM for its off-topic check; here that model is missing, so
the check is skipped (and logged once) rather than crashing the gateway. The install is made in a fresh virtual
environment from a copy of the sources (``pyproject.toml``, ``README.md``, ``src/``), so the build writes nothing
into the working tree, with ``-c constraints.txt`` for the tested versions; it takes about 20 s with a warm pip
cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import Server, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
INSTALL_BUDGET_S = 240  # the Dockerfile's gateway image does the same install; it must stay quick
HEAVY = ("numpy", "torch", "transformers", "sentence_transformers")


def _clean_env() -> dict[str, str]:
    """This environment less what would let the base venv see the development one (or override the config)."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ALIGNPRO_")}


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with ``pip install .`` and nothing else; its bin folder."""
    tmp = tmp_path_factory.mktemp("base-install")
    sources = tmp / "alignpro"
    shutil.copytree(ROOT / "src", sources / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, sources / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_clean_env(), timeout=120)
    t0 = time.monotonic()
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "-c", str(ROOT / "constraints.txt"), str(sources)],
        check=True,
        env=_clean_env(),
        cwd=tmp,
        timeout=INSTALL_BUDGET_S + 60,
    )
    took = time.monotonic() - t0
    print(f"pip install . (base) took {took:.1f} s")
    assert took < INSTALL_BUDGET_S, f"the base install took {took:.0f} s"
    return venv / "bin"


def _python(bin_dir: Path, code: str) -> subprocess.CompletedProcess[str]:
    # -I: no user site, no PYTHON* variables, no current directory on sys.path: only what the venv installed.
    return subprocess.run(
        [str(bin_dir / "python"), "-I", "-c", code],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=bin_dir,
        timeout=120,
    )


def test_the_server_imports_without_numpy(base_venv: Path) -> None:
    res = _python(base_venv, "import alignpro, alignpro.server.app, sys; print(alignpro.__file__)")
    assert res.returncode == 0, res.stderr
    assert str(base_venv.parent) in res.stdout, f"alignpro did not come from the base venv: {res.stdout}"
    res = _python(base_venv, "import numpy")
    assert res.returncode != 0 and "No module named 'numpy'" in res.stderr, (res.stdout, res.stderr)
    probe = "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in %r}))"
    res = _python(base_venv, probe % (HEAVY,))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == dict.fromkeys(HEAVY, False)


def test_a_command_that_needs_an_extra_says_so(base_venv: Path) -> None:
    res = subprocess.run(
        [str(base_venv / "alignpro"), "train", "some.yaml", "--resume"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=120,
    )
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "needs numpy" in res.stderr and "alignpro[train]" in res.stderr, res.stderr


@pytest.fixture()
def upstream() -> Iterator[FaultInjector]:
    fi = FaultInjector(free_port()).start()
    yield fi
    fi.stop()


def test_serve_answers_through_a_reference_prompter(
    base_venv: Path, upstream: FaultInjector, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"""
engines:
  stub:
    kind: openai
    urls: ["{upstream.url}"]
    model: ok
aliases:
  aligned:
    engine: stub
    prompter:
      mode: reference
      engine: stub
      allowed_modes: [optimal]
"""
    )
    port = free_port()
    server = Server(
        "base-gateway",
        [str(base_venv / "alignpro"), "serve", "--port", str(port), "--config", str(config)],
        f"http://127.0.0.1:{port}/health",
        env={"PYTHONUNBUFFERED": "1"},
        log_path=tmp_path / "gateway.log",
        unset=[k for k in os.environ if k.startswith("ALIGNPRO_") or k in ("PYTHONPATH", "PYTHONHOME")],
    )
    with server.start(timeout=120):
        chat = {
            "model": "aligned",
            "messages": [{"role": "user", "content": "Say hello to the base install."}],
        }
        for _ in range(2):
            r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["alignpro"]["mode"] == "reference", body
            assert body["choices"][0]["message"]["content"] == "ok"
            assert r.headers["x-alignpro-mode"] == "reference"
        # The prompter and the frozen model were both asked, twice (the rewrite cache is keyed by text, so the
        # second prompter call may be a cache hit).
        assert upstream.received["ok"] >= 3, upstream.received
        assert httpx.get(f"{server.url}/ready", timeout=30).status_code == 200
        # Mode optimal needs the [local] extra: a request for it is told so, the gateway keeps serving.
        optimal = {**chat, "alignpro": {"mode": "optimal"}}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=optimal, timeout=30)
        assert r.status_code == 400 and "[local]" in r.json()["error"]["message"], r.text
    log = server.log_text()
    assert log.count("the off-topic check of prompter outputs is off") == 1, log
    assert "Traceback" not in log, log


def test_enabling_the_gate_says_it_needs_the_local_extra(
    base_venv: Path, upstream: FaultInjector, tmp_path: Path
) -> None:
    """The prompter gate reads MiniLM embeddings: without the [local] extra, serving it is refused at start."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"""
engines:
  stub: {{kind: openai, urls: ["{upstream.url}"], model: ok}}
aliases:
  aligned:
    engine: stub
    prompter: {{mode: reference, engine: stub, gate: {{enabled: true}}}}
"""
    )
    res = subprocess.run(
        [str(base_venv / "alignpro"), "serve", "--port", str(free_port()), "--config", str(config)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=120,
    )
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "prompter.gate.enabled needs the [local] extra" in res.stderr and "numpy" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
