"""Fault injection: what the gateway does when the things behind it break, and that it recovers.

Upstreams are the FaultInjector (a real HTTP server on loopback that breaks on request) or a port nothing listens
on; the gateway is a real process unless the test needs to look inside an engine. Every case must end in the
right status, or a clean stream error event, within its timeout; and the gateway must serve normally again as
soon as the upstream is back. tests/test_gateway.py covers the basic status mapping; this file covers
ejection and recovery, stream timeouts, a prompter that hangs or raises, client disconnects and shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from alignpro.engines.base import Engine
from alignpro.engines.factory import Timeouts, build_engine
from alignpro.engines.openai import OpenAIEngine
from alignpro.errors import UpstreamUnavailableError
from alignpro.prompter.stage import PrompterStage
from alignpro.server.app import create_app
from alignpro.settings import EngineConfig, PrompterConfig, Settings
from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import Server, free_port, start_gateway

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, **CHAT, **extra}


def wait_until(cond: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


@pytest.fixture(scope="module")
def fi() -> Iterator[FaultInjector]:
    f = FaultInjector(free_port()).start()
    yield f
    f.stop()


class SlamDoor:
    """A fault: a TCP server that accepts each connection and closes it without answering."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.recv(65536)
            conn.close()

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------ gateway process with faults
@pytest.fixture(scope="module")
def revive_port() -> int:
    """A port with no upstream yet: test_gateway_serves_as_soon_as_its_upstream_is_back starts one there."""
    return free_port()


@pytest.fixture(scope="module")
def gw(
    fi: FaultInjector, revive_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Server]]:
    door = SlamDoor()
    config = f"""
read_timeout_s: 1.0
request_timeout_s: 2.0
rewrite_cache_size: 0
engines:
  fi: {{kind: openai, urls: ["{fi.url}"], model: ok}}
  slowfirst: {{kind: openai, urls: ["{fi.url}"], model: slow-30}}
  stall: {{kind: openai, urls: ["{fi.url}"], model: slowstream-3}}
  trickle: {{kind: openai, urls: ["{fi.url}"], model: slowstream-0.5}}
  door: {{kind: openai, urls: ["http://127.0.0.1:{door.port}/v1"], model: ok}}
  busy: {{kind: openai, urls: ["{fi.url}"], model: ratelimit-1000000}}
  p_hang: {{kind: openai, urls: ["{fi.url}"], model: slow-30}}
  p_500: {{kind: openai, urls: ["{fi.url}"], model: status-500}}
  p_badjson: {{kind: openai, urls: ["{fi.url}"], model: badjson}}
  later: {{kind: openai, urls: ["http://127.0.0.1:{revive_port}/v1"], model: ok, failure_threshold: 1,
          probe_interval_s: 0.25}}
aliases:
  later: {{engine: later, prompter: {{mode: off}}}}
  ok: {{engine: fi, prompter: {{mode: off}}}}
  busy: {{engine: busy, prompter: {{mode: off}}}}
  slowfirst: {{engine: slowfirst, prompter: {{mode: off}}}}
  stall: {{engine: stall, prompter: {{mode: off}}}}
  trickle: {{engine: trickle, prompter: {{mode: off}}}}
  door: {{engine: door, prompter: {{mode: off}}}}
  hang-open: {{engine: fi, prompter: {{engine: p_hang, timeout_s: 1.0, fail_policy: open}}}}
  hang-closed: {{engine: fi, prompter: {{engine: p_hang, timeout_s: 1.0, fail_policy: closed}}}}
  raise-open: {{engine: fi, prompter: {{engine: p_500, fail_policy: open}}}}
  raise-closed: {{engine: fi, prompter: {{engine: p_500, fail_policy: closed}}}}
  garbage-open: {{engine: fi, prompter: {{engine: p_badjson, fail_policy: open}}}}
"""
    server, url = start_gateway(tmp_path_factory.mktemp("faults"), config)
    yield url, server
    server.stop()
    door.close()


def test_upstream_that_hangs_up_is_a_502(gw: tuple[str, Server]) -> None:
    url, _ = gw
    t = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json=body("door"), timeout=10)
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
    assert time.monotonic() - t < 2


def test_upstream_rate_limit_is_relayed_with_its_retry_after(gw: tuple[str, Server]) -> None:
    """An overloaded upstream's 429 reaches the caller as a 429 with the upstream's Retry-After, streaming or
    not, so that a client backs off for as long as the upstream asked (openai-python honours the header)."""
    url, _ = gw
    for stream in (False, True):
        r = httpx.post(f"{url}/v1/chat/completions", json=body("busy", stream=stream), timeout=10)
        assert r.status_code == 429 and r.headers.get("retry-after") == "1", (stream, r.text)
        assert r.json()["error"]["code"] == "ratelimit"


def test_stream_whose_first_byte_is_late_is_a_504(gw: tuple[str, Server]) -> None:
    url, _ = gw
    t = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json=body("slowfirst", stream=True), timeout=10)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert time.monotonic() - t < 3  # read_timeout_s = 1


def test_stream_that_stalls_ends_with_a_timeout_event(gw: tuple[str, Server]) -> None:
    """Events 3 s apart against a 1 s read timeout: one event, then an error event and [DONE], in time."""
    url, _ = gw
    t = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body("stall", stream=True), timeout=10) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert time.monotonic() - t < 3
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "upstream_timeout"
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "0"


@pytest.mark.parametrize("alias", ["hang-open", "raise-open", "garbage-open"])
def test_prompter_failure_fails_open(gw: tuple[str, Server], alias: str) -> None:
    url, _ = gw
    t = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json=body(alias), timeout=10)
    assert time.monotonic() - t < 3  # the hanging prompter is cut at timeout_s = 1
    assert r.status_code == 200, r.text
    assert r.headers["x-alignpro-degraded"] == "prompter-unavailable"
    data = r.json()
    assert data["alignpro"]["fallback"] == "prompter_unavailable" and data["alignpro"]["rewritten"] is False
    assert data["choices"][0]["message"]["content"] == "ok"


@pytest.mark.parametrize("alias", ["hang-closed", "raise-closed"])
def test_prompter_failure_fails_closed(gw: tuple[str, Server], alias: str) -> None:
    url, _ = gw
    t = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json=body(alias, stream=True), timeout=10)
    assert time.monotonic() - t < 3
    assert r.status_code == 503 and r.json()["error"]["code"] == "prompter_unavailable"


def test_fallbacks_are_counted(gw: tuple[str, Server]) -> None:
    url, _ = gw
    httpx.post(f"{url}/v1/chat/completions", json=body("raise-open"), timeout=10)
    metrics = httpx.get(f"{url}/metrics").text
    line = next(
        s
        for s in metrics.splitlines()
        if s.startswith('alignpro_prompter_fallbacks_total{reason="prompter_unavailable"}')
    )
    assert float(line.split()[-1]) >= 1


def test_client_disconnect_cancels_the_upstream_stream(gw: tuple[str, Server], fi: FaultInjector) -> None:
    url, _ = gw
    before = fi.streams["abandoned"]
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body("trickle", stream=True), timeout=10
    ) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event arrived; now hang up (6 events 0.5 s apart would take 3 s)
    assert wait_until(lambda: fi.streams["abandoned"] > before, timeout=2.0), fi.streams
    # Nothing is left running in the gateway either (the one request in flight is this /metrics call).
    assert wait_until(
        lambda: "alignpro_inflight_requests 1.0" in httpx.get(f"{url}/metrics").text, timeout=2.0
    )


def test_serves_normally_after_all_of_the_above(gw: tuple[str, Server]) -> None:
    url, _ = gw
    r = httpx.post(f"{url}/v1/chat/completions", json=body("ok"), timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"


# --------------------------------------------------------------------------- circuit breaker and recovery
def _engine(urls: list[str], threshold: int = 2, probe: float = 0.2) -> OpenAIEngine:
    cfg = EngineConfig(
        kind="openai", urls=urls, model="ok", failure_threshold=threshold, probe_interval_s=probe
    )
    engine = build_engine(
        "e", cfg, Timeouts.of(Settings(connect_timeout_s=1, read_timeout_s=2, request_timeout_s=3))
    )
    assert isinstance(engine, OpenAIEngine)
    return engine


async def test_dead_replica_is_ejected_then_probed_back(fi: FaultInjector) -> None:
    port = free_port()
    engine = _engine([f"http://127.0.0.1:{port}/v1", fi.url])
    await engine.start()
    revived: FaultInjector | None = None
    try:
        dead = engine.replicas[0]
        for _ in range(4):  # connection refused is retried on the live replica: callers see no error
            assert (await engine.chat(body("ok")))["choices"][0]["message"]["content"] == "ok"
        assert not dead.healthy and dead.failures >= 2
        revived = await asyncio.to_thread(FaultInjector(port).start)
        for _ in range(40):
            if dead.healthy:
                break
            await asyncio.sleep(0.05)
        assert dead.healthy, "the prober did not bring the replica back"
        for _ in range(6):
            await engine.chat(body("ok"))
        assert revived.received["ok"] >= 1  # traffic goes to it again
    finally:
        await engine.aclose()
        if revived is not None:
            await asyncio.to_thread(revived.stop)


async def test_failing_replica_is_not_called_while_ejected(fi: FaultInjector) -> None:
    """Answers of 500 eject the replica: later calls fail fast with 503 instead of reaching it."""
    engine = _engine([fi.url], threshold=2, probe=30)
    await engine.start()
    try:
        for _ in range(2):
            with pytest.raises(Exception) as err:
                await engine.chat(body("status-500"))
            assert getattr(err.value, "status_code", None) == 502
        seen = fi.received["status-500"]
        t = time.monotonic()
        with pytest.raises(UpstreamUnavailableError):
            await engine.chat(body("status-500"))
        assert time.monotonic() - t < 0.1 and fi.received["status-500"] == seen
        # /ready probes every replica and takes a live one back at once.
        assert (await engine.ready())["replicas"]["0"] is True
        assert (await engine.chat(body("ok")))["choices"][0]["message"]["content"] == "ok"
    finally:
        await engine.aclose()


async def test_retries_only_where_nothing_can_run_twice(fi: FaultInjector) -> None:
    """With two replicas: a 503 ("not taken on") is tried on the other one; a read timeout and a stream that
    broke off after it started are not retried (the work may have run)."""
    other = await asyncio.to_thread(FaultInjector(free_port()).start)
    cfg = EngineConfig(kind="openai", urls=[fi.url, other.url], model="ok", failure_threshold=100)
    engine = build_engine(
        "two", cfg, Timeouts.of(Settings(connect_timeout_s=1, read_timeout_s=1, request_timeout_s=3))
    )
    await engine.start()

    def sent(model: str) -> int:
        return fi.received[model] + other.received[model]

    try:
        with pytest.raises(Exception) as err:
            await engine.chat(body("status-503"))
        assert sent("status-503") == 2 and getattr(err.value, "status_code", None) in (502, 503)
        with pytest.raises(Exception) as err:
            await engine.chat(body("slow-5"))
        assert sent("slow-5") == 1 and getattr(err.value, "status_code", None) == 504
        events = [e async for e in engine.chat_stream(body("dropstream", stream=True))]
        assert sent("dropstream") == 1
        assert events[-1] == b"data: [DONE]\n\n" and b"stream_interrupted" in events[-2]
    finally:
        await engine.aclose()
        await asyncio.to_thread(other.stop)


def test_gateway_serves_as_soon_as_its_upstream_is_back(gw: tuple[str, Server], revive_port: int) -> None:
    """The upstream of alias `later` is down from the start: 503 (ejected after one failure, then failing
    fast), until an upstream appears on its port; the prober takes it back within its 0.25 s interval."""
    url, _ = gw
    for _ in range(2):
        r = httpx.post(f"{url}/v1/chat/completions", json=body("later"), timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    revived = FaultInjector(revive_port).start()
    try:
        t = time.monotonic()
        ok = wait_until(
            lambda: (
                httpx.post(f"{url}/v1/chat/completions", json=body("later"), timeout=10).status_code == 200
            ),
            timeout=3.0,
            step=0.1,
        )
        assert ok and time.monotonic() - t < 3.0
        assert revived.received["ok"] >= 1
    finally:
        revived.stop()


# --------------------------------------------------------------------------- a prompter that raises anything
class ExplodingEngine(Engine):
    """A fault: an engine whose every call raises an error no engine is supposed to raise."""

    kind = "exploding"

    async def ready(self) -> dict[str, Any]:
        return {}

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("injected: CUDA error: device-side assert triggered")

    def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        raise RuntimeError("injected")

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("injected")

    def completion_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        raise RuntimeError("injected")

    def default_model(self) -> str:
        return "x"


async def test_a_prompter_bug_is_a_fallback_not_a_500() -> None:
    engine = ExplodingEngine("boom")
    opened = PrompterStage(PrompterConfig(engine="boom", fail_policy="open"), engine)
    rw = await opened.rewrite("Hi", "reference")
    assert rw.prompt == "Hi" and rw.info.fallback == "prompter_unavailable"
    closed = PrompterStage(PrompterConfig(engine="boom", fail_policy="closed"), engine)
    with pytest.raises(UpstreamUnavailableError):
        await closed.rewrite("Hi", "reference")


# --------------------------------------------------------------------------------------------- draining
async def test_a_draining_app_refuses_new_work() -> None:
    from alignpro.server.shutdown import Drain

    drain = Drain()
    settings = Settings(
        engines={"e": EngineConfig(kind="openai", urls=["http://127.0.0.1:9/v1"])},
        aliases={"a": {"engine": "e", "prompter": {"mode": "off"}}},
    )
    app = create_app(settings, drain=drain)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
        assert (await c.get("/health")).status_code == 200
        drain.begin()
        assert (await c.get("/health")).status_code == 200  # liveness holds: the process is fine
        r = await c.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        r = await c.post("/v1/chat/completions", json=body("a"))
        assert r.status_code == 503 and r.headers["connection"] == "close"


def _serve(
    tmp: Path, fi: FaultInjector, grace: float, alias_model: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cfg = tmp / f"g{port}.yaml"
    cfg.write_text(
        f"engines:\n  fi: {{kind: openai, urls: ['{fi.url}'], model: {alias_model}}}\n"
        "aliases:\n  s: {engine: fi, prompter: {mode: off}}\n"
    )
    env = {**os.environ, "ALIGNPRO_SHUTDOWN_GRACE_S": str(grace)}
    args = [sys.executable, "-m", "alignpro.cli.main", "serve", "--port", str(port), "--config", str(cfg)]
    log = open(tmp / f"g{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: _up(url), timeout=60, step=0.2), (tmp / f"g{port}.log").read_text()
    return proc, url


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _stream_in_thread(url: str, out: list[str]) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions", json=body("s", stream=True), timeout=30
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        out.append(line[6:])
        except httpx.HTTPError as exc:
            out.append(f"!{type(exc).__name__}")

    t = threading.Thread(target=run)
    t.start()
    return t


def _stop_and_wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise


def test_sigterm_drains_inflight_streams(tmp_path: Path, fi: FaultInjector) -> None:
    """A 3 s stream under way when SIGTERM arrives finishes with [DONE]; new connections are refused."""
    proc, url = _serve(tmp_path, fi, grace=10, alias_model="slowstream-0.5")
    events: list[str] = []
    try:
        t = _stream_in_thread(url, events)
        assert wait_until(lambda: len(events) >= 1, timeout=10)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
        t.join(timeout=15)
        assert events[-1] == "[DONE]" and len([e for e in events if e.startswith("{")]) == 7, events
        # uvicorn re-raises the signal once it has shut down cleanly, so the status is "killed by SIGTERM".
        assert _stop_and_wait(proc, timeout=10) in (0, -signal.SIGTERM)
        assert (
            "Finished server process"
            in (tmp_path / next(p.name for p in tmp_path.glob("g*.log"))).read_text()
        )
        assert time.monotonic() - t0 < 6
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_grace_period_bounds_the_shutdown(tmp_path: Path, fi: FaultInjector) -> None:
    """ALIGNPRO_SHUTDOWN_GRACE_S=1 with a 12 s stream: the process is gone in about a second, upstream closed."""
    abandoned = fi.streams["abandoned"]
    proc, url = _serve(tmp_path, fi, grace=1, alias_model="slowstream-2")
    events: list[str] = []
    try:
        t = _stream_in_thread(url, events)
        assert wait_until(lambda: len(events) >= 1, timeout=10)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        _stop_and_wait(proc, timeout=10)
        assert time.monotonic() - t0 < 4
        t.join(timeout=10)
        assert "[DONE]" not in events  # cut off, as promised by the grace period
        assert wait_until(lambda: fi.streams["abandoned"] > abandoned, timeout=3), fi.streams
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------------- the local engine
@pytest.mark.slow
async def test_local_stream_cancelled_by_the_client_stops_decoding(model_dir: Path) -> None:
    """Closing a local stream after a few tokens frees the decoder: the next request waits about as long as
    on an idle engine, not for the ~400 decoding steps the abandoned stream asked for (the one decoder runs
    one batch at a time). Timed relative to the idle engine, since the machine may be busy."""
    from alignpro.engines.local import LocalEngine

    engine = LocalEngine("local", EngineConfig(model=str(model_dir)))
    await engine.start()
    one = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    try:
        t = time.monotonic()
        await engine.chat(one)
        idle = time.monotonic() - t
        req = {
            "model": "x",
            "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 400,
            "temperature": 1.0,
            "seed": 1,
            "stream": True,
        }
        gen = engine.chat_stream(req)
        got = 0
        t = time.monotonic()
        async for _ in gen:
            got += 1
            if got == 4:  # the role chunk and three tokens
                break
        per_token = (time.monotonic() - t) / 3
        await gen.aclose()  # type: ignore[attr-defined]
        t = time.monotonic()
        resp = await engine.chat(one)
        after = time.monotonic() - t
        assert resp["choices"][0]["finish_reason"] in ("length", "stop")
        # Not cancelled, it would wait ~396 more steps: far more than either bound below.
        assert after < 3 * idle + 20 * per_token, (after, idle, per_token)
    finally:
        await engine.aclose()


# ------------------------------------------------------------------------------------------ a short soak
def test_short_soak_loses_nothing() -> None:
    """bench/soak.py for 15 s at concurrency 16 against the FaultInjector: every request answered or given a
    clear error, the gateway alive, its memory flat (the full 10-minute run is the benchmark)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "soak", Path(__file__).resolve().parents[2] / "bench" / "soak.py"
    )
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = soak  # its dataclasses look their module up there
    spec.loader.exec_module(soak)
    res = soak.run("fault", duration=15, concurrency=16, max_tokens=8, sample_every=1.0)
    assert res["sent"] > 50, res["outcomes"]
    assert res["lost"] == 0, res["lost_examples"]
    assert res["answered"] == res["sent"] and res["gateway_alive_at_end"]
    assert res["outcomes"]["ok"] > 0 and res["outcomes"].get("error 422", 0) > 0  # both paths were exercised
    assert res["rss"]["growth"] < 0.25, res["rss"]
