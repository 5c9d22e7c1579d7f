"""FastTransport (the OpenAI engine's HTTP/1.1 wire layer) against real servers on loopback.

The upstream is the FaultInjector (a real uvicorn server in a thread) plus, for keep-alive expiry, a uvicorn
server that drops idle connections after 1 s. No model is involved, so these run in a few seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from alignpro.engines.transport import FastTransport
from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import free_port


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultInjector]:
    fi = FaultInjector(free_port()).start()
    yield fi
    fi.stop()


def _client(max_connections: int = 8, read: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=FastTransport(max_connections), timeout=httpx.Timeout(5.0, read=read))


def _idle(client: httpx.AsyncClient) -> int:
    transport = client._transport
    assert isinstance(transport, FastTransport)
    return sum(len(p.idle) for p in transport.pools.values())


async def test_json_and_keep_alive_reuse(upstream: FaultInjector) -> None:
    async with _client() as c:
        for _ in range(3):
            r = await c.post(upstream.url + "/chat/completions", json={"model": "ok"})
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == "ok"
        assert _idle(c) == 1  # three sequential requests, one connection


async def test_concurrency_is_bounded_and_connections_return(upstream: FaultInjector) -> None:
    async with _client(max_connections=4) as c:
        rs = await asyncio.gather(
            *(c.post(upstream.url + "/chat/completions", json={"model": "ok"}) for _ in range(20))
        )
        assert {r.status_code for r in rs} == {200}
        assert _idle(c) == 4


async def test_error_status_and_bad_json_are_responses(upstream: FaultInjector) -> None:
    async with _client() as c:
        r = await c.post(upstream.url + "/chat/completions", json={"model": "status-400"})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "injected 400"
        r = await c.post(upstream.url + "/chat/completions", json={"model": "badjson"})
        assert r.status_code == 200 and r.content == b"<html>not json"


async def test_read_timeout(upstream: FaultInjector) -> None:
    async with _client(read=0.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post(upstream.url + "/chat/completions", json={"model": "slow-3"})
        assert _idle(c) == 0  # a timed-out connection is never reused


async def test_connection_refused() -> None:
    async with _client() as c:
        with pytest.raises(httpx.ConnectError):
            await c.post(f"http://127.0.0.1:{free_port()}/v1/chat/completions", json={})


async def test_stream_arrives_event_by_event(upstream: FaultInjector) -> None:
    async with (
        _client() as c,
        c.stream(
            "POST", upstream.url + "/chat/completions", json={"model": "slowstream-0.2", "stream": True}
        ) as r,
    ):
        chunks = [chunk async for chunk in r.aiter_raw()]
    assert len(chunks) >= 7  # six content events, the last one and [DONE], not one buffered blob
    assert chunks[-1].endswith(b"data: [DONE]\n\n")


async def test_dropped_stream_raises(upstream: FaultInjector) -> None:
    async with _client() as c:
        with pytest.raises(httpx.ReadError):
            async with c.stream(
                "POST", upstream.url + "/chat/completions", json={"model": "dropstream", "stream": True}
            ) as r:
                async for _ in r.aiter_raw():
                    pass


async def test_abandoned_stream_closes_the_connection(upstream: FaultInjector) -> None:
    before = upstream.streams["abandoned"]
    async with _client() as c:
        async with c.stream(
            "POST", upstream.url + "/chat/completions", json={"model": "slowstream-0.3", "stream": True}
        ) as r:
            async for _ in r.aiter_raw():
                break
        assert _idle(c) == 0
        for _ in range(50):  # the upstream notices the disconnect when it next writes
            if upstream.streams["abandoned"] > before:
                break
            await asyncio.sleep(0.1)
    assert upstream.streams["abandoned"] == before + 1


async def test_connection_closed_by_idle_server_is_replaced() -> None:
    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    port = free_port()
    app = Starlette(routes=[Route("/x", ok, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, port=port, timeout_keep_alive=1, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        async with _client() as c:
            for pause in (1.3, 0.95, 0.0):  # past the server's keep-alive, then right around it
                r = await c.post(f"http://127.0.0.1:{port}/x", json={})
                assert r.json() == {"ok": True}
                await asyncio.sleep(pause)
    finally:
        server.should_exit = True
        await task
