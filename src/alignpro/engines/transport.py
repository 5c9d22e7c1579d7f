"""A lean HTTP/1.1 transport for httpx: asyncio protocol + httptools parser, keep-alive pool per origin.

Why: the gateway's own work per pass-through request is small; httpx's default transport (httpcore on anyio) was
most of it -- the pool scans every connection on each request and every socket operation goes through anyio's
task-checkpoint machinery -- so the gateway's CPU per request grew with concurrency (bench/README.md). This
transport keeps httpx's client API, exceptions, timeouts and streaming, so :mod:`alignpro.engines.openai`
behaves the same; only the wire layer is different:

* one ``transport.write`` per request (head and body together), the response parsed by httptools (the parser
  uvicorn uses) in ``data_received``;
* idle connections in a LIFO list per origin; one whose peer closed it is dropped before reuse;
* a response body streams chunk by chunk as it arrives (SSE events are relayed without waiting for more);
  reading pauses when the consumer falls behind;
* a response closed before its end (client went away, stream aborted) closes the connection, so the upstream
  sees the disconnect (vLLM then aborts the generation); a finished keep-alive response returns it to the pool.

Plain ``http://`` only, no HTTP/2, no proxies, no TLS: for TLS or anything else it hands the request to httpx's
default transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, Literal, Protocol, cast

import httptools
import httpx

_MAX_BUFFERED = 64  # body chunks queued before reading from the socket pauses


class _Conn(asyncio.Protocol):
    """One keep-alive connection; serves one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.error: BaseException | None = None
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.head_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.chunks: deque[bytes] = deque()
        self.more = asyncio.Event()  # set when chunks, the end or an error arrived
        self.complete = False
        self.received_any = False
        self.paused = False
        self.keep_alive = False
        self.until_close = False  # a body with neither content-length nor chunking ends with the connection

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but it quacks

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # never asked for
            self._fail(httpx.RemoteProtocolError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.until_close and exc is None and not self.complete:
            self.complete = True
            self.more.set()
        if not self.complete:
            if not self.head_done.done() and not self.received_any:
                err: BaseException = httpx.RemoteProtocolError(
                    "server disconnected without sending a response"
                )
            else:
                err = httpx.ReadError(f"the connection closed mid-response ({exc or 'EOF'})")
            self._fail(err)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # only meaningful now, not after the message
        names = {k.lower() for k, _ in self.headers}
        self.until_close = (
            b"content-length" not in names
            and b"transfer-encoding" not in names
            and self.status not in (204, 304)
        )
        if not self.head_done.done():
            self.head_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.more.set()
        if len(self.chunks) >= _MAX_BUFFERED and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True
        self.more.set()

    # helpers
    def _fail(self, err: BaseException) -> None:
        if self.error is None:
            self.error = err
        if not self.head_done.done():
            self.head_done.set_exception(err)
            self.head_done.exception()  # mark retrieved: the request may already have gone
        self.more.set()
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def reusable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    async def next_chunk(self, timeout: float | None) -> bytes | None:
        """The next body chunk, or None at the end of the message."""
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                if self.paused and len(self.chunks) < _MAX_BUFFERED // 2 and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self.more.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self.more.wait()
            except TimeoutError:
                raise httpx.ReadTimeout("timed out waiting for the upstream's response body") from None


class _Body(httpx.AsyncByteStream):
    def __init__(self, pool: _Pool, conn: _Conn, read_timeout: float | None) -> None:
        self.pool = pool
        self.conn = conn
        self.read_timeout = read_timeout
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while True:
                chunk = await self.conn.next_chunk(self.read_timeout)
                if chunk is None:
                    break
                yield chunk
        except BaseException:
            await self.aclose()
            raise
        await self.aclose()

    async def aclose(self) -> None:
        if self.done:
            return
        self.done = True
        self.pool.release(self.conn)


class _Pool:
    """Connections to one origin: idle ones (LIFO) and a bound on how many may exist."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Conn] = []
        self.slots = asyncio.Semaphore(max_connections)

    async def acquire(self, connect_timeout: float | None, pool_timeout: float | None) -> tuple[_Conn, bool]:
        """A connection (and whether it was reused); the caller hands it back with :meth:`release`."""
        try:
            async with asyncio.timeout(pool_timeout):
                await self.slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection to the upstream in time") from None
        try:
            while self.idle:
                conn = self.idle.pop()
                if conn.reusable():
                    conn._reset()
                    return conn, True
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(connect_timeout):
                    _, proto = await loop.create_connection(_Conn, self.host, self.port)
            except TimeoutError:
                raise httpx.ConnectTimeout(f"connecting to {self.host}:{self.port} timed out") from None
            except OSError as exc:
                raise httpx.ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
            return proto, False
        except BaseException:
            self.slots.release()
            raise

    def release(self, conn: _Conn) -> None:
        keep = conn.complete and conn.error is None and conn.reusable() and conn.keep_alive
        if keep:
            self.idle.append(conn)
        else:
            conn.close()
        self.slots.release()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class FastTransport(httpx.AsyncBaseTransport):
    """httpx transport for plain-HTTP/1.1 upstreams (vLLM, OpenAI-compatible servers on a private network)."""

    def __init__(self, max_connections: int = 256) -> None:
        self.max_connections = max_connections
        self.pools: dict[tuple[str, int], _Pool] = {}
        self._fallback: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport(
                    limits=httpx.Limits(max_connections=self.max_connections)
                )
            return await self._fallback.handle_async_request(request)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        host, port = url.host, url.port or 80
        pool = self.pools.get((host, port))
        if pool is None:
            pool = self.pools[(host, port)] = _Pool(host, port, self.max_connections)
        body = await request.aread()
        target = url.raw_path.decode("ascii")
        head = [f"{request.method} {target} HTTP/1.1\r\n".encode("ascii")]
        head += [k + b": " + v + b"\r\n" for k, v in request.headers.raw]
        head.append(b"\r\n")
        payload = b"".join(head) + body

        for attempt in (0, 1):
            conn, reused = await pool.acquire(timeouts.get("connect"), timeouts.get("pool"))
            try:
                return await self._exchange(pool, conn, payload, timeouts)
            except httpx.RemoteProtocolError:
                # A kept-alive connection the server closed as we reused it (uvicorn drops idle ones after
                # 5 s) and that sent nothing back: sent again once, on a new connection.
                if not reused or conn.received_any or attempt:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    async def _exchange(
        pool: _Pool, conn: _Conn, payload: bytes, timeouts: dict[str, float | None]
    ) -> httpx.Response:
        try:
            assert conn.transport is not None
            conn.transport.write(payload)
            try:
                async with asyncio.timeout(timeouts.get("read")):
                    await conn.head_done
            except TimeoutError:
                raise httpx.ReadTimeout("timed out waiting for the upstream's response headers") from None
        except BaseException as exc:
            conn.close()
            pool.release(conn)
            if isinstance(exc, httpx.TransportError) or not isinstance(exc, Exception):
                raise
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(pool, conn, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": b""},
        )

    async def aclose(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
        if self._fallback is not None:
            await self._fallback.aclose()


# ---------------------------------------------------------------------------------------------- A/B variants
# How the openai engine talks to its upstream (EngineConfig.transport), measured against each other by
# bench/passthrough.py --variant transport=NAME (bench/README.md, section 1).
Transport = Literal["alignpro", "httpx", "httpx-aiohttp", "aiohttp"]


class UpstreamClient(Protocol):
    """What the engine calls on its client (httpx.AsyncClient has it); errors are httpx's. Answers have
    httpx.Response's ``status_code``, ``headers``, ``content``, ``json()``, ``aread()``, ``aiter_raw()``,
    ``aclose()``."""

    async def get(self, url: str, *, timeout: float) -> Any: ...
    async def post(self, url: str, *, json: Any) -> Any: ...
    def build_request(self, method: str, url: str, *, json: Any) -> Any: ...
    async def send(self, request: Any, *, stream: bool) -> Any: ...
    async def aclose(self) -> None: ...


def upstream_client(
    kind: Transport,
    timeout: httpx.Timeout,
    headers: dict[str, str],
    max_connections: int,
    on_request: Callable[[httpx.Request], Awaitable[None]],
) -> httpx.AsyncClient | AiohttpClient:
    """The engine's HTTP client: httpx's API over ``kind``'s wire layer, or aiohttp itself."""
    if kind == "aiohttp":
        return AiohttpClient(timeout, headers, max_connections)
    transport: httpx.AsyncBaseTransport
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    if kind == "alignpro":
        transport = FastTransport(max_connections=max_connections)
    elif kind == "httpx":
        transport = httpx.AsyncHTTPTransport(limits=limits)
    else:
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport(limits=limits)
    return httpx.AsyncClient(
        timeout=timeout, headers=headers, transport=transport, event_hooks={"request": [on_request]}
    )


class _AioResponse:
    def __init__(self, resp: Any, content: bytes | None = None) -> None:
        self._resp = resp
        self.status_code: int = resp.status
        self.headers: Mapping[str, str] = resp.headers
        self._content = content

    @property
    def content(self) -> bytes:
        assert self._content is not None, "a streamed response: aread() it first"
        return self._content

    def json(self) -> Any:
        return json.loads(self.content)

    async def aread(self) -> bytes:
        if self._content is None:
            with _aiohttp_errors():
                self._content = await self._resp.read()
        return self._content

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        with _aiohttp_errors():
            async for chunk in self._resp.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self._resp.release()  # back to the pool when read to the end, else the connection is closed


class AiohttpClient:
    """aiohttp's ClientSession behind the few httpx calls the engine makes, its errors mapped to httpx's."""

    def __init__(self, timeout: httpx.Timeout, headers: dict[str, str], max_connections: int) -> None:
        self.timeout, self.headers, self.max_connections = timeout, headers, max_connections
        self._session: Any = None

    def _open(self) -> Any:
        import aiohttp

        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self.headers, auto_decompress=False
            )
        return self._session

    def _timeout(self, read: float | None) -> Any:
        import aiohttp

        t = self.timeout
        return aiohttp.ClientTimeout(total=None, connect=t.pool, sock_connect=t.connect, sock_read=read)

    async def _request(self, url: str, body: Any, read: float | None, stream: bool) -> _AioResponse:
        from alignpro.engines.base import REQUEST_ID

        headers = {"content-type": "application/json"} if body is not None else {}
        rid = REQUEST_ID.get()
        if rid is not None:
            headers["x-request-id"] = rid
        data = None if body is None else json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        method = "GET" if body is None else "POST"
        with _aiohttp_errors():
            resp = await self._open().request(
                method, url, data=data, headers=headers, timeout=self._timeout(read), allow_redirects=False
            )
            if stream:
                return _AioResponse(resp)
            try:
                return _AioResponse(resp, await resp.read())
            finally:
                resp.release()

    async def get(self, url: str, *, timeout: float) -> _AioResponse:
        return await self._request(url, None, timeout, stream=False)

    async def post(self, url: str, *, json: Any) -> _AioResponse:
        return await self._request(url, json, self.timeout.read, stream=False)

    def build_request(self, method: str, url: str, *, json: Any) -> tuple[str, Any]:
        return url, json

    async def send(self, request: tuple[str, Any], *, stream: bool) -> _AioResponse:
        return await self._request(request[0], request[1], self.timeout.read, stream)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


@contextlib.contextmanager
def _aiohttp_errors() -> Iterator[None]:
    """aiohttp's exceptions as the httpx ones the engine tells apart: nothing sent (connect, pool) vs the rest."""
    import aiohttp

    try:
        yield
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc)) from exc
    except aiohttp.SocketTimeoutError as exc:
        raise httpx.ReadTimeout(str(exc)) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
        raise httpx.RemoteProtocolError(str(exc)) from exc
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise httpx.ReadError(str(exc)) from exc
