"""``alignpro serve --workers N``: several real gateway processes on one port (src/alignpro/server/workers.py).

The gateway runs as ``alignpro serve --workers 2`` in front of the FaultInjector. Which process served a request
is read from the audit line the gateway writes for it (its ``pid`` field; the request id is the client's
``x-request-id``), so nothing is added to responses for the tests. Each request of a spread test opens a
connection of its own: the kernel picks a worker per connection.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alignpro.testing.faults import FaultInjector
from alignpro.testing.redis import start_redis
from alignpro.testing.servers import Server, child_pids, gateway_server

KEY = "sk-workers-5c1e"
RPM = 30


def _config(faults: FaultInjector, extra: str = "") -> str:
    return f"""
engines:
  fi: {{kind: openai, urls: ["{faults.url}"], model: ok}}
aliases:
  plain: {{engine: fi, prompter: {{mode: "off"}}}}
  slow: {{engine: fi, model: slowstream-0.5, prompter: {{mode: "off"}}}}
{extra}
"""


def _gateway(tmp: Path, config: str, env: dict[str, str] | None = None) -> Server:
    server = gateway_server(tmp, config, env=env)
    server.args += ["--workers", "2"]
    server.grace = 20.0
    return server


def _audit_pids(server: Server) -> dict[str, int]:
    """request id -> pid of the process that served it, from the audit lines in the server's log."""
    out: dict[str, int] = {}
    for line in server.log_text().splitlines():
        if line.startswith('{"event": "request"'):
            rec = json.loads(line)
            out[rec["request_id"]] = rec["pid"]
    return out


def _workers(parent: int) -> list[int]:
    """The supervisor's worker processes (its other child is multiprocessing's resource tracker)."""
    out = []
    for pid in child_pids(parent):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(cond: object, timeout: float) -> bool:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())


def _fresh_connection_posts(url: str, n: int, prefix: str, **headers: str) -> list[int]:
    """``n`` chat requests, each on a new connection, with request ids ``prefix-<i>``; their statuses."""
    codes = []
    for i in range(n):
        with httpx.Client(timeout=30) as c:
            r = c.post(
                f"{url}/v1/chat/completions",
                json={"model": "plain", "messages": [{"role": "user", "content": "Hi"}]},
                headers={"x-request-id": f"{prefix}-{i}", **headers},
            )
            codes.append(r.status_code)
    return codes


def _served_by(server: Server, prefix: str) -> set[int]:
    return {pid for rid, pid in _audit_pids(server).items() if rid.startswith(prefix + "-")}


@pytest.fixture
def two_workers(faults: FaultInjector, tmp_path: Path) -> Iterator[Server]:
    server = _gateway(tmp_path, _config(faults), {"ALIGNPRO_SHUTDOWN_GRACE_S": "10"}).start(timeout=180)
    try:
        yield server
    finally:
        server.stop()


def test_requests_are_spread_over_the_workers(two_workers: Server) -> None:
    codes = _fresh_connection_posts(two_workers.url, 24, "spread")
    assert codes == [200] * 24
    pids = _served_by(two_workers, "spread")
    workers = set(_workers(two_workers.pid))
    assert len(pids) == 2 and pids == workers, (pids, workers)
    assert two_workers.pid not in pids
    # No Redis: the log says that limits and the cache are the workers' own.
    assert "rate limits and the rewrite cache are per worker" in two_workers.log_text()


def _stream(url: str, rid: str, out: list[str]) -> None:
    try:
        body = {"model": "slow", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        with (
            httpx.Client(timeout=30) as c,
            c.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"x-request-id": rid}) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
    except httpx.HTTPError as exc:
        out.append(f"!{type(exc).__name__}")


def test_sigterm_drains_every_worker_and_leaves_no_process(two_workers: Server) -> None:
    """12 streams of ~3.5 s under way (on both workers) when the supervisor gets SIGTERM: each ends with [DONE],
    new connections are refused, the supervisor exits 0 and none of its processes is left."""
    url, parent = two_workers.url, two_workers.pid
    family = [parent, *child_pids(parent)]
    streams: dict[str, list[str]] = {f"drain-{i}": [] for i in range(12)}
    threads = [threading.Thread(target=_stream, args=(url, rid, out)) for rid, out in streams.items()]
    for t in threads:
        t.start()
    assert _wait(lambda: all(out for out in streams.values()), timeout=30), streams
    os.kill(parent, signal.SIGTERM)
    assert _wait(lambda: not _accepts(url), timeout=3), "the port still accepts connections"
    for t in threads:
        t.join(timeout=30)
    for rid, out in streams.items():
        assert out[-1] == "[DONE]" and sum(e.startswith("{") for e in out) == 7, (rid, out)
    assert two_workers.proc is not None and two_workers.proc.wait(timeout=30) == 0
    assert len(_served_by(two_workers, "drain")) == 2  # both workers had streams to drain
    assert _wait(lambda: not any(_alive(p) for p in family), timeout=5), [p for p in family if _alive(p)]


def _accepts(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.ConnectError:
        return False
    except httpx.HTTPError:
        pass
    return True


def test_a_dead_worker_is_replaced_and_a_dead_supervisor_leaves_no_worker(two_workers: Server) -> None:
    parent = two_workers.pid
    first = _workers(parent)
    assert len(first) == 2, first
    os.kill(first[0], signal.SIGKILL)
    assert _wait(lambda: len(set(_workers(parent)) - {first[0]}) == 2, timeout=60), _workers(parent)
    new = (set(_workers(parent)) - set(first)).pop()
    # The new worker serves (the kernel queued its socket's connections for it meanwhile).
    codes = _fresh_connection_posts(two_workers.url, 24, "replaced")
    assert codes == [200] * 24
    assert _served_by(two_workers, "replaced") == {first[1], new}
    assert "exited with status -9: starting another" in two_workers.log_text()

    workers = child_pids(parent)  # the resource tracker too
    os.kill(parent, signal.SIGKILL)
    assert two_workers.proc is not None and two_workers.proc.wait(timeout=10) == -signal.SIGKILL
    # Each worker sees its parent change within a second, drains and exits.
    assert _wait(lambda: not any(_alive(p) for p in workers), timeout=15), [p for p in workers if _alive(p)]
    assert not _accepts(two_workers.url)


def test_workers_share_a_keys_rate_limit_through_redis(faults: FaultInjector, tmp_path: Path) -> None:
    """3 x RPM requests of one key, each on a new connection, over 2 workers sharing one Redis: the key gets
    its RPM (plus the bucket's refill meanwhile), not RPM per worker, and both workers served some of them."""
    redis, redis_url = start_redis(tmp_path)
    env = {"ALIGNPRO_API_KEYS": json.dumps([{"key": KEY, "rate_limit_rpm": RPM}])}
    server = _gateway(tmp_path, _config(faults, f'redis_url: "{redis_url}"'), env)
    try:
        server.start(timeout=180)
        t0 = time.monotonic()
        codes = _fresh_connection_posts(server.url, 3 * RPM, "limit", authorization=f"Bearer {KEY}")
        took = time.monotonic() - t0
        allowed = codes.count(200)
        assert set(codes) == {200, 429}, codes
        assert RPM <= allowed <= RPM + 1 + took * RPM / 60, (allowed, took)
        ok = {f"limit-{i}" for i, c in enumerate(codes) if c == 200}
        assert len({pid for rid, pid in _audit_pids(server).items() if rid in ok}) == 2
        assert "shared by the workers through Redis" in server.log_text()
    finally:
        server.stop()
        redis.stop()


def test_a_worker_that_cannot_start_stops_the_server(faults: FaultInjector, tmp_path: Path) -> None:
    """A setting that fails in the workers only (a Redis URL of an unknown scheme, read when the app is built):
    the supervisor does not restart them forever, it exits with uvicorn's startup-failure status, 3."""
    server = _gateway(tmp_path, _config(faults, 'redis_url: "foo://nowhere"'))
    with pytest.raises(RuntimeError, match="exited with status 3"):
        server.start(timeout=120)
    assert "failed to start" in server.log_text()
