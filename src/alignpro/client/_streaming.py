"""Server-sent event streams: :class:`Stream` (sync) and :class:`AsyncStream`, typed by the chunk model.

A stream is an iterator of chunks. It ends at ``data: [DONE]``; an ``{"error": ...}`` event raises
:class:`~alignpro.client.APIStreamError`, and a connection that ends before ``[DONE]`` raises
:class:`~alignpro.client.APIConnectionError` (a stream cut short must not look like a complete answer). Closing
the stream, leaving its ``with`` block, or reaching its end closes the HTTP response, and so the connection: the
gateway sees the client go and stops generating.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from alignpro.client._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStreamError,
    error_fields,
    transport_error,
)
from alignpro.protocol import AlignProInfo

T = TypeVar("T", bound=BaseModel)

DONE = "[DONE]"


class _Done(Exception):
    """``[DONE]`` arrived: the stream ends here (raised by :meth:`_StreamBase._feed`, caught by ``_reading``)."""


@dataclass
class ServerSentEvent:
    data: str
    event: str | None = None


@dataclass
class SSEDecoder:
    """Lines in, events out (the WHATWG event-stream rules that OpenAI-style servers use)."""

    _data: list[str] = field(default_factory=list)
    _event: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:  # a blank line dispatches the event gathered so far
            if not self._data and self._event is None:
                return None
            sse = ServerSentEvent("\n".join(self._data), self._event)
            self._data, self._event = [], None
            return sse
        if line.startswith(":"):  # a comment (keep-alive)
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def flush(self) -> ServerSentEvent | None:
        """The last event, when the body ended without its blank line."""
        return self.feed("")


class _StreamBase(Generic[T]):
    def __init__(self, response: httpx.Response, cast: type[T], request_id: str | None) -> None:
        self.response = response
        self.request_id = response.headers.get("x-request-id") or request_id
        self.alignpro: AlignProInfo | None = None
        """What the prompter did: from the first chunk, so set once the first chunk has been read."""
        self._cast = cast
        self._decoder = SSEDecoder()

    @property
    def headers(self) -> httpx.Headers:
        """The response headers, ``x-alignpro-*`` included (available before the first chunk)."""
        return self.response.headers

    def _feed(self, line: str) -> T | None:
        """The chunk that ``line`` completes, if any; raises :class:`_Done` at ``[DONE]``."""
        return self._take(self._decoder.feed(line))

    def _take(self, sse: ServerSentEvent | None) -> T | None:
        """The chunk in ``sse`` (``None``: no event yet); raises :class:`_Done` at ``[DONE]``."""
        if sse is None:
            return None
        chunk = self._decode(sse)
        if chunk is None:
            raise _Done
        return chunk

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Around the loop over the body's lines (the one thing the twins do differently): ``[DONE]`` ends the
        stream, a transport error becomes an :class:`~alignpro.client.APIError`, and a body that ends without
        ``[DONE]`` (in a last event that lacks its blank line, say) raises :meth:`_ended_early`."""
        try:
            yield
            self._take(self._decoder.flush())  # the last event, when the body ended without its blank line
        except _Done:
            return
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        raise self._ended_early()

    def _decode(self, sse: ServerSentEvent) -> T | None:
        """The chunk in an event; ``None`` at ``[DONE]``."""
        if sse.data == DONE:
            return None
        try:
            payload: Any = json.loads(sse.data)
        except ValueError as exc:
            raise self._invalid(f"a stream event is not JSON: {sse.data[:200]!r}") from exc
        if sse.event == "error" or (isinstance(payload, dict) and "error" in payload):
            fields = error_fields(payload)
            message = fields.pop("message", None) or "the stream reported an error"
            raise APIStreamError(message, request_id=self.request_id, body=payload, **fields)
        try:
            chunk = self._cast.model_validate(payload)
        except ValidationError as exc:
            raise self._invalid(f"a stream event is not a {self._cast.__name__}: {exc}") from exc
        if self.alignpro is None:
            info = getattr(chunk, "alignpro", None)
            if isinstance(info, AlignProInfo):
                self.alignpro = info
        return chunk

    def _invalid(self, message: str) -> APIResponseValidationError:
        return APIResponseValidationError(
            message, status=self.response.status_code, request_id=self.request_id
        )

    def _transport_error(self, exc: httpx.HTTPError) -> APIError:
        return transport_error(exc, self.request_id, streaming=True)

    def _ended_early(self) -> APIConnectionError:
        return APIConnectionError(
            "the stream ended before [DONE]", code="stream_interrupted", request_id=self.request_id
        )


class Stream(_StreamBase[T]):
    """Chunks of a streamed response; use it in a ``with`` block or close it when leaving early."""

    def __init__(self, response: httpx.Response, cast: type[T], request_id: str | None) -> None:
        super().__init__(response, cast, request_id)
        self._iterator = self._chunks()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._iterator)

    def _chunks(self) -> Generator[T, None, None]:
        try:
            with self._reading():
                for line in self.response.iter_lines():
                    if (chunk := self._feed(line)) is not None:
                        yield chunk
        finally:
            self.response.close()

    def close(self) -> None:
        """Stop reading and close the connection (idempotent)."""
        self._iterator.close()
        self.response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_StreamBase[T]):
    """Chunks of a streamed response; use it in an ``async with`` block or ``await close()`` it."""

    def __init__(self, response: httpx.Response, cast: type[T], request_id: str | None) -> None:
        super().__init__(response, cast, request_id)
        self._iterator = self._chunks()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self._iterator.__anext__()

    async def _chunks(self) -> AsyncGenerator[T, None]:
        try:
            with self._reading():
                async for line in self.response.aiter_lines():
                    if (chunk := self._feed(line)) is not None:
                        yield chunk
        finally:
            await self.response.aclose()

    async def close(self) -> None:
        """Stop reading and close the connection (idempotent)."""
        await self._iterator.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
