"""UpstreamClient (the OpenAI engine's aiohttp client) against real servers on loopback.

The upstream is the FaultInjector (a real uvicorn server in a thread), plus a uvicorn app that answers each
request with the client port it came from (which connection was used) and drops idle connections after 1 s.
No model is involved, so these run in a few seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from alignpro.engines.base import REQUEST_ID
from alignpro.engines.transport import UpstreamClient
from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import free_port


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultInjector]:
    fi = FaultInjector(free_port()).start()
    yield fi
    fi.stop()


@pytest.fixture
async def ports() -> AsyncIterator[str]:
    """A server answering ``{"port": <the client's port>}`` after ``?wait`` seconds, gzipped when the client
    accepts it; idle connections: 1 s."""

    async def port(request: Request) -> JSONResponse:
        await asyncio.sleep(float(request.query_params.get("wait", 0)))
        assert request.client is not None
        return JSONResponse({"port": request.client.port})

    p = free_port()
    app = GZipMiddleware(Starlette(routes=[Route("/port", port, methods=["GET", "POST"])]), minimum_size=1)
    server = uvicorn.Server(uvicorn.Config(app, port=p, timeout_keep_alive=1, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{p}/port"
    server.should_exit = True
    await task


def _client(max_connections: int = 8, read: float = 5.0) -> UpstreamClient:
    return UpstreamClient(httpx.Timeout(5.0, read=read), {"authorization": "Bearer k"}, max_connections)


async def _port(c: UpstreamClient, url: str) -> int:
    r = await c.post(url, json={})
    assert r.status_code == 200
    return int(r.json()["port"])


async def test_json_headers_and_keep_alive_reuse(upstream: FaultInjector, ports: str) -> None:
    c = _client()
    try:
        token = REQUEST_ID.set("rid-1")
        r = await c.post(
            upstream.url + "/chat/completions", json={"model": "echo", "messages": [{"content": "é"}]}
        )
        REQUEST_ID.reset(token)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "é"
        headers = upstream.last_headers[-1]
        assert headers["x-request-id"] == "rid-1" and headers["authorization"] == "Bearer k"
        assert headers["content-type"] == "application/json"
        assert (
            len({await _port(c, ports) for _ in range(3)}) == 1
        )  # three sequential requests, one connection
    finally:
        await c.aclose()


async def test_connections_per_upstream_are_bounded(ports: str) -> None:
    c = _client(max_connections=4)
    try:
        used = await asyncio.gather(*(_port(c, ports + "?wait=0.05") for _ in range(20)))
        assert len(set(used)) == 4
    finally:
        await c.aclose()


async def test_error_status_and_bad_json_are_responses(upstream: FaultInjector) -> None:
    c = _client()
    try:
        r = await c.post(upstream.url + "/chat/completions", json={"model": "status-400"})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "injected 400"
        r = await c.post(upstream.url + "/chat/completions", json={"model": "badjson"})
        assert r.status_code == 200 and r.content == b"<html>not json"
        with pytest.raises(ValueError):
            r.json()
    finally:
        await c.aclose()


async def test_read_timeout(upstream: FaultInjector) -> None:
    c = _client(read=0.5)
    try:
        with pytest.raises(httpx.ReadTimeout):
            await c.post(upstream.url + "/chat/completions", json={"model": "slow-3"})
    finally:
        await c.aclose()


async def test_connection_refused_is_a_connect_error() -> None:
    """The one error after which the engine may try another replica: nothing was sent."""
    c = _client()
    try:
        with pytest.raises(httpx.ConnectError):
            await c.post(f"http://127.0.0.1:{free_port()}/v1/chat/completions", json={})
    finally:
        await c.aclose()


async def test_stream_arrives_event_by_event(upstream: FaultInjector) -> None:
    c = _client()
    try:
        r = await c.stream(
            upstream.url + "/chat/completions", json={"model": "slowstream-0.2", "stream": True}
        )
        chunks = [chunk async for chunk in r.aiter_raw()]
        await r.aclose()
    finally:
        await c.aclose()
    assert len(chunks) >= 7  # six content events, the last one and [DONE], not one buffered blob
    assert chunks[-1].endswith(b"data: [DONE]\n\n")


async def test_dropped_stream_is_a_transport_error_not_a_connect_error(upstream: FaultInjector) -> None:
    """Cut off mid-body: an error the engine never retries on another replica (the request was taken)."""
    c = _client()
    try:
        r = await c.stream(upstream.url + "/chat/completions", json={"model": "dropstream", "stream": True})
        with pytest.raises(httpx.TransportError) as info:
            async for _ in r.aiter_raw():
                pass
        assert not isinstance(info.value, httpx.ConnectError | httpx.ConnectTimeout)
        await r.aclose()
    finally:
        await c.aclose()


async def test_abandoned_stream_closes_the_connection(upstream: FaultInjector) -> None:
    before = upstream.streams["abandoned"]
    c = _client()
    try:
        r = await c.stream(
            upstream.url + "/chat/completions", json={"model": "slowstream-0.3", "stream": True}
        )
        async for _ in r.aiter_raw():
            break
        await r.aclose()
        for _ in range(50):  # the upstream notices the disconnect when it next writes
            if upstream.streams["abandoned"] > before:
                break
            await asyncio.sleep(0.1)
    finally:
        await c.aclose()
    assert upstream.streams["abandoned"] == before + 1


async def test_connection_closed_by_idle_server_is_replaced(ports: str) -> None:
    c = _client()
    try:
        first = await _port(c, ports)
        await asyncio.sleep(1.3)  # past the server's keep-alive: it closed the connection
        assert await _port(c, ports) != first
    finally:
        await c.aclose()
