"""An ``openai`` engine with several replicas: spreading, ejection, probing back, and when a retry is allowed.

Topology, all real processes on loopback except the fault injector:

    test ──> front gateway (engine "replicas": urls = [r0, r1, r2])
                 ├──> r0: alignpro serve (pass-through) ──> ReplicaFaultInjector /r0/v1
                 ├──> r1: alignpro serve (pass-through) ──> ReplicaFaultInjector /r1/v1
                 └──> r2: alignpro serve (pass-through) ──> ReplicaFaultInjector /r2/v1

The replicas are real gateway processes, so the front talks HTTP to real servers that answer, fail, go away
and come back. Behind them sits one ReplicaFaultInjector: a deliberately fake, instant OpenAI-shaped server in
a thread of the test process, used only to inject faults (slow, 4xx/5xx, dropped stream, hang) per replica and
to count the requests each replica's upstream *received*. No model runs here, so this module is cheap on CPU.

With every replica idle the front picks the first one in its list (least outstanding, ties in list order), so
a fault injected on r0 is always the one the request meets first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from alignpro.testing.servers import Server, free_port, gateway_server

pytestmark = pytest.mark.slow

N = 3
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


# ------------------------------------------------------------------------------------------ fault injector
@dataclass
class Fault:
    mode: str = "ok"  # ok | status | drop | hang
    delay_s: float = 0.0  # ok: wait this long before answering
    status: int = 500  # status: answer this HTTP status with an OpenAI error body


@dataclass
class ReplicaFaultInjector:
    """FaultInjector (fake, for fault injection only): per-replica faults and received-request counts."""

    port: int = field(default_factory=free_port)
    faults: list[Fault] = field(default_factory=lambda: [Fault() for _ in range(N)])
    received: list[int] = field(default_factory=lambda: [0] * N)

    def __post_init__(self) -> None:
        app = Starlette(
            routes=[
                Route("/r{i:int}/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/r{i:int}/v1/models", self._models, methods=["GET"]),
            ]
        )
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self._server.run, name="fault-injector", daemon=True)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.port}/r{i}/v1"

    def start(self) -> ReplicaFaultInjector:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fault injector did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def reset(self) -> None:
        self.faults = [Fault() for _ in range(N)]
        self.received = [0] * N

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def _chat(self, request: Request) -> Response:
        i = int(request.path_params["i"])
        body = await request.json()
        self.received[i] += 1
        fault = self.faults[i]
        if fault.mode == "status":
            err = {"message": f"injected {fault.status}", "type": "BadRequestError", "code": fault.status}
            return JSONResponse({"error": err}, status_code=fault.status)
        # hang: longer than the front's read timeout, short enough to be over before the servers stop.
        await asyncio.sleep(5.0 if fault.mode == "hang" else fault.delay_s)
        if body.get("stream"):
            return StreamingResponse(self._events(i, fault.mode == "drop"), media_type="text/event-stream")
        return JSONResponse(_completion(i))

    async def _events(self, i: int, drop: bool) -> AsyncIterator[bytes]:
        for k in range(3):
            if drop and k == 2:
                # Raising mid-body makes uvicorn cut the connection without ending the chunked body: the
                # gateway sees a stream that broke off after it had started.
                raise ConnectionAbortedError("injected: stream dropped")
            chunk = {
                "id": f"chatcmpl-r{i}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": "fake",
                "choices": [{"index": 0, "delta": {"content": f"r{i}-{k} "}, "finish_reason": None}],
            }
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            await asyncio.sleep(0.01)
        yield b"data: [DONE]\n\n"


def _completion(i: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-r{i}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": f"r{i}"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


# ------------------------------------------------------------------------------------------ processes
def replica_config(upstream: str) -> str:
    # A pass-through gateway. It must not eject its single upstream while faults are injected on purpose.
    return f"""
engines:
  fi: {{kind: openai, urls: ["{upstream}"], model: fake, failure_threshold: 1000, probe_interval_s: 0.5}}
aliases:
  smollm2: {{engine: fi, prompter: {{mode: "off"}}}}
"""


def front_config(replicas: list[Server], *, failure_threshold: int, read_timeout_s: float = 30.0) -> str:
    urls = ", ".join(f'"{r.url}/v1"' for r in replicas)
    return f"""
read_timeout_s: {read_timeout_s}
engines:
  replicas: {{kind: openai, urls: [{urls}], model: smollm2, failure_threshold: {failure_threshold},
             probe_interval_s: 0.5}}
aliases:
  smollm2: {{engine: replicas, prompter: {{mode: "off"}}}}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replicas")


@pytest.fixture(scope="module")
def injector() -> Iterator[ReplicaFaultInjector]:
    fi = ReplicaFaultInjector().start()
    try:
        yield fi
    finally:
        fi.stop()


@pytest.fixture(scope="module")
def replicas(injector: ReplicaFaultInjector, workdir: Path) -> Iterator[list[Server]]:
    servers: list[Server] = []
    try:
        for i in range(N):
            servers.append(gateway_server(workdir, replica_config(injector.url(i)), name=f"r{i}").start(60.0))
        yield servers  # a test that restarts one puts the new Server in its slot
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def fresh(injector: ReplicaFaultInjector) -> ReplicaFaultInjector:
    injector.reset()
    return injector


@contextlib.contextmanager
def front(workdir: Path, replicas: list[Server], **kw: Any) -> Iterator[Server]:
    server = gateway_server(workdir, front_config(replicas, **kw), name="front").start(60.0)
    try:
        yield server
    finally:
        server.stop()


def chat(gw: Server, **extra: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, **extra}, timeout=TIMEOUT)


def stream_lines(gw: Server) -> tuple[int, list[str]]:
    with (
        httpx.Client(timeout=TIMEOUT) as http,
        http.stream("POST", f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        return r.status_code, [line for line in r.iter_lines() if line.startswith("data: ")]


def settle(fi: ReplicaFaultInjector, seconds: float = 0.5) -> list[int]:
    """The received counts after a pause, so a late duplicate would have arrived."""
    time.sleep(seconds)
    return list(fi.received)


# ------------------------------------------------------------------------------------------ tests
def test_requests_spread_by_least_outstanding(
    fresh: ReplicaFaultInjector, replicas: list[Server], workdir: Path
) -> None:
    with front(workdir, replicas, failure_threshold=3) as gw:
        # Six concurrent slow requests: each goes to a replica with the fewest in flight, so two each.
        for f in fresh.faults:
            f.delay_s = 3.0
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: chat(gw), range(6)))
        assert [r.status_code for r in results] == [200] * 6
        assert fresh.received == [2, 2, 2]

        # A replica busy with a long request is passed over while it is busy (round robin would not).
        fresh.reset()
        fresh.faults[0].delay_s = 4.0
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(chat, gw)
            deadline = time.monotonic() + 10
            while fresh.received[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            quick = [chat(gw).json()["choices"][0]["message"]["content"] for _ in range(4)]
            assert slow.result().status_code == 200
        assert fresh.received == [1, 4, 0]
        assert quick == ["r1"] * 4


def test_failed_replica_is_ejected_then_probed_back(
    fresh: ReplicaFaultInjector, replicas: list[Server], workdir: Path
) -> None:
    with front(workdir, replicas, failure_threshold=2) as gw:
        r0 = replicas[0]
        r0.stop()  # by pid: its port now refuses connections
        # Connection refused means nothing was sent: the request is retried on the next replica.
        first = chat(gw)
        assert first.status_code == 200 and first.json()["choices"][0]["message"]["content"] == "r1"
        code, lines = stream_lines(gw)  # the same for a stream that could not be opened
        assert code == 200 and lines[-1] == "data: [DONE]" and '"r1-0 "' in lines[0]
        assert fresh.received == [0, 2, 0]
        # Two consecutive failures = failure_threshold: r0 is out of rotation, and the front says so.
        assert f"upstream {r0.url}/v1 ejected after 2 failures" in gw.log_text()
        ready = httpx.get(f"{gw.url}/ready", timeout=TIMEOUT)
        assert ready.status_code == 200  # r1 and r2 still answer
        assert ready.json()["engines"]["replicas"]["ejected"] == [
            0
        ]  # by position in urls: /ready shows no URL

        # r0 comes back on the same port; the probe (GET /models every 0.5 s) puts it back in rotation, and
        # being first in the list and idle, it takes the next request.
        replicas[0] = gateway_server(workdir, replica_config(fresh.url(0)), port=r0.port, name="r0").start(60)
        deadline = time.monotonic() + 20
        while fresh.received[0] == 0 and time.monotonic() < deadline:
            assert chat(gw).status_code == 200
            time.sleep(0.2)
        assert fresh.received[0] >= 1, "the replica that came back never got traffic again"
        assert f"upstream {r0.url}/v1 is back" in gw.log_text()
        assert httpx.get(f"{gw.url}/ready", timeout=TIMEOUT).json()["engines"]["replicas"]["ejected"] == []


def test_no_request_reaches_two_replicas_once_received(
    fresh: ReplicaFaultInjector, replicas: list[Server], workdir: Path
) -> None:
    # A high threshold keeps r0 in rotation through all the faults below, so each one meets r0 first.
    with front(workdir, replicas, failure_threshold=100, read_timeout_s=2.0) as gw:
        # r0's upstream answers 500 after taking the request: r0 says 502, and the front relays that rather
        # than run the request a second time elsewhere.
        fresh.faults[0] = Fault(mode="status", status=500)
        r = chat(gw)
        assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
        assert settle(fresh) == [1, 0, 0]

        # A stream that broke off after it started: the caller gets what came, an error event and [DONE].
        fresh.reset()
        fresh.faults[0] = Fault(mode="drop")
        code, lines = stream_lines(gw)
        assert code == 200 and lines[-1] == "data: [DONE]"
        assert '"r0-0 "' in lines[0] and any('"error"' in line for line in lines)
        assert settle(fresh) == [1, 0, 0]

        # The upstream took the request and went quiet: a 504 at the front's read timeout, no second try.
        fresh.reset()
        fresh.faults[0] = Fault(mode="hang")
        r = chat(gw)
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        assert settle(fresh) == [1, 0, 0]

        # A client error is the request's fault, not the replica's: relayed in the OpenAI shape, not retried.
        fresh.reset()
        fresh.faults[0] = Fault(mode="status", status=400)
        r = chat(gw)
        assert r.status_code == 400
        assert r.json()["error"] == {
            "message": "injected 400",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_value",
        }
        assert settle(fresh) == [1, 0, 0]

        # 503 means "not taken on" (vLLM overloaded, a gateway with no upstream): that one may go elsewhere.
        fresh.reset()
        fresh.faults[0] = Fault(mode="status", status=503)
        r = chat(gw)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "r1"
        assert settle(fresh) == [1, 1, 0]
