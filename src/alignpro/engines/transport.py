"""The openai engine's HTTP client: aiohttp, behind the few calls the engine makes, with httpx's exceptions.

Why aiohttp: a hand-written httpx transport (an asyncio protocol + the httptools parser, in this module until
issue 15) once cut the gateway's CPU per pass-through request 2-7x against httpx's own transport. Measured
again in one ``bench/passthrough.py`` run against httpx-aiohttp (httpx's API over aiohttp) and aiohttp itself
(bench/README.md, section 1), it no longer earned its place: aiohttp itself cost *less* CPU per request, and
httpx-aiohttp was within 1.5x of it. The rule was to keep ours only if it still won by >= 1.5x, so it went.

:class:`UpstreamClient` is what :class:`~alignpro.engines.openai.OpenAIEngine` needs and nothing more:

* ``get``/``post`` (the body read in full) and ``stream`` (relayed chunk by chunk as the upstream sends it:
  SSE events are not held back); answers have ``status_code``, ``headers``, ``content``, ``json()``,
  ``aread()``, ``aiter_raw()`` and ``aclose()``, as httpx's responses do;
* one keep-alive pool, at most ``max_connections`` connections per upstream; idle ones are closed after
  :data:`KEEPALIVE_S`, before uvicorn-based upstreams (vLLM: 5 s) close them, so a request is not sent on a
  connection the upstream is closing at that moment;
* a stream closed before its end (the client went away) closes its connection, so the upstream sees the
  disconnect and vLLM aborts the generation; a finished one goes back to the pool;
* errors are httpx's exception classes, the engine's vocabulary: :class:`httpx.ConnectError`,
  :class:`httpx.ConnectTimeout` when nothing was sent (the engine may try another replica), and
  :class:`httpx.ReadTimeout`, :class:`httpx.RemoteProtocolError`, :class:`httpx.ReadError` for the rest
  (never retried). httpx-aiohttp maps a server that disconnects mid-request to ``ConnectTimeout``, which would
  have made the engine send the request twice: one more reason not to use it;
* the gateway's request id goes upstream as ``x-request-id``; with tracing on, each call is a client span and
  sends ``traceparent`` (:meth:`UpstreamClient.trace`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx

from alignpro.engines.base import REQUEST_ID

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

KEEPALIVE_S = 4.0  # idle upstream connections are closed after this: below uvicorn's (vLLM's) 5 s


class UpstreamResponse:
    """An upstream's answer: the parts of httpx.Response the engine reads."""

    def __init__(self, resp: aiohttp.ClientResponse, content: bytes | None = None) -> None:
        self._resp = resp
        self.status_code = resp.status
        self.headers: Mapping[str, str] = resp.headers
        self._content = content

    @property
    def content(self) -> bytes:
        if self._content is None:
            raise httpx.ResponseNotRead()
        return self._content

    def json(self) -> Any:
        return json.loads(self.content)

    async def aread(self) -> bytes:
        if self._content is None:
            with _httpx_errors():
                self._content = await self._resp.read()
        return self._content

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for chunk in self._resp.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._resp.content.at_eof():
            self._resp.release()  # read to its end: the connection goes back to the pool
        else:
            self._resp.close()  # abandoned: closing the connection tells the upstream


class UpstreamClient:
    """aiohttp's ClientSession for one engine (see the module's docstring). Open it inside the event loop."""

    def __init__(self, timeout: httpx.Timeout, headers: dict[str, str], max_connections: int) -> None:
        self.timeout = timeout
        self.headers = headers
        self.max_connections = max_connections
        self._traces: list[aiohttp.TraceConfig] = []
        self._session: aiohttp.ClientSession | None = None

    def trace(self, provider: TracerProvider) -> None:
        """Make each call a client span of ``provider`` and send ``traceparent`` (before the first call)."""
        if self._session is not None:
            raise RuntimeError("trace() must come before the client's first request")
        self._traces.append(_trace_config(provider))

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=self.max_connections, keepalive_timeout=KEEPALIVE_S
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self.headers,  # aiohttp adds Accept-Encoding and decodes what comes compressed
                trace_configs=self._traces or None,
            )
        return self._session

    async def _request(self, url: str, body: Any, read: float | None, stream: bool) -> UpstreamResponse:
        headers = {}
        data = None
        if body is not None:  # encoded as httpx encodes json=
            headers["content-type"] = "application/json"
            data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        rid = REQUEST_ID.get()
        if rid is not None:
            headers["x-request-id"] = rid
        t = self.timeout
        timeout = aiohttp.ClientTimeout(total=None, connect=t.pool, sock_connect=t.connect, sock_read=read)
        with _httpx_errors():
            resp = await self._open().request(
                "GET" if body is None else "POST",
                url,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )
            if stream:
                return UpstreamResponse(resp)
            try:
                return UpstreamResponse(resp, await resp.read())
            finally:
                resp.release()

    async def get(self, url: str, *, timeout: float) -> UpstreamResponse:
        return await self._request(url, None, timeout, stream=False)

    async def post(self, url: str, *, json: Any) -> UpstreamResponse:
        return await self._request(url, json, self.timeout.read, stream=False)

    async def stream(self, url: str, *, json: Any) -> UpstreamResponse:
        """POST ``json``; the answer's body is left to ``aiter_raw()`` (or ``aread()``), then ``aclose()``."""
        return await self._request(url, json, self.timeout.read, stream=True)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """aiohttp's exceptions as httpx's: nothing sent (connect, pool wait) apart from everything else."""
    try:
        yield
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    except aiohttp.ConnectionTimeoutError as exc:  # connecting, or waiting for a pooled connection
        raise httpx.ConnectTimeout(str(exc)) from exc
    except aiohttp.SocketTimeoutError as exc:
        raise httpx.ReadTimeout(str(exc)) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc


def _trace_config(provider: TracerProvider) -> aiohttp.TraceConfig:
    """Client spans (named by the method, as opentelemetry-instrumentation-httpx names them) and W3C
    ``traceparent`` on every request: the upstream's spans join the gateway's trace."""
    from opentelemetry import trace
    from opentelemetry.propagate import inject
    from opentelemetry.trace import SpanKind, Status, StatusCode

    tracer = provider.get_tracer("alignpro.engines")

    async def start(session: Any, ctx: Any, params: aiohttp.TraceRequestStartParams) -> None:
        attributes = {"http.request.method": params.method, "url.full": str(params.url.with_query(None))}
        ctx.span = tracer.start_span(params.method, kind=SpanKind.CLIENT, attributes=attributes)
        with trace.use_span(ctx.span, end_on_exit=False):
            inject(params.headers)

    async def end(session: Any, ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
        ctx.span.set_attribute("http.response.status_code", params.response.status)
        if params.response.status >= 500:
            ctx.span.set_status(Status(StatusCode.ERROR))
        ctx.span.end()

    async def failed(session: Any, ctx: Any, params: aiohttp.TraceRequestExceptionParams) -> None:
        ctx.span.record_exception(params.exception)
        ctx.span.set_status(Status(StatusCode.ERROR, type(params.exception).__name__))
        ctx.span.end()

    config = aiohttp.TraceConfig()
    config.on_request_start.append(start)
    config.on_request_end.append(end)
    config.on_request_exception.append(failed)
    return config
