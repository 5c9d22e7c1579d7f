"""The asynchronous client, :class:`AsyncAlignPro`: the twin of :mod:`alignpro.client._sync`, awaiting I/O."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import httpx
from pydantic import BaseModel
from typing_extensions import Unpack

from alignpro.client._base import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    BaseClient,
    Call,
    ChatParams,
    CompletionParams,
    Messages,
    RequestOptions,
    Timeout,
    parse,
    request_body,
)
from alignpro.client._errors import APIError, transport_error
from alignpro.client._streaming import AsyncStream
from alignpro.protocol import (
    AlignProOptions,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ModelList,
    RewriteResponse,
)

M = TypeVar("M", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)


class AsyncAlignPro(BaseClient):
    """A client for the AlignPro gateway (or any OpenAI-compatible server, for the OpenAI routes).

    >>> client = AsyncAlignPro(base_url="http://127.0.0.1:8000/v1")
    >>> await client.chat.completions.create(model="smollm2-aligned", messages=[{"role": "user", "content": "Hi"}])

    Pass ``http_client`` to use your own ``httpx.AsyncClient`` (proxies, transports); it is then yours to close.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient()
        self.chat = Chat(self)
        self.completions = Completions(self)
        self.models = Models(self)

    # ------------------------------------------------------------------------------------------ API
    @overload
    async def rewrite(
        self,
        *,
        model: str,
        prompt: str,
        alignpro: AlignProOptions | Mapping[str, Any] | None = None,
        **options: Unpack[RequestOptions],
    ) -> RewriteResponse: ...

    @overload
    async def rewrite(
        self,
        *,
        model: str,
        messages: Messages,
        alignpro: AlignProOptions | Mapping[str, Any] | None = None,
        **options: Unpack[RequestOptions],
    ) -> RewriteResponse: ...

    async def rewrite(
        self,
        *,
        model: str,
        prompt: str | None = None,
        messages: Messages | None = None,
        alignpro: AlignProOptions | Mapping[str, Any] | None = None,
        **options: Unpack[RequestOptions],
    ) -> RewriteResponse:
        """The prompt the frozen model would receive for ``prompt`` (or the last user turn of ``messages``),
        without an answer: ``POST /v1/alignpro/rewrite``."""
        body = request_body(
            {"model": model, "prompt": prompt, "messages": messages, "alignpro": alignpro}, options
        )
        return await self._request(self._call("POST", "alignpro/rewrite", body, options), RewriteResponse)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncAlignPro:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -------------------------------------------------------------------------------------- plumbing
    async def _send(self, call: Call, stream: bool) -> httpx.Response:
        """A 2xx response (body unread when ``stream``), after retries; anything else raises."""
        attempt = 0
        while True:
            error: APIError
            try:
                response = await self._http.send(self._build(self._http, call), stream=True)
            except httpx.HTTPError as exc:
                error = transport_error(exc, call.request_id)
            else:
                try:
                    if response.is_success and stream:
                        return response
                    await response.aread()  # a non-streaming body, or an error body
                except httpx.HTTPError as exc:
                    await response.aclose()
                    error = transport_error(exc, call.request_id)
                else:
                    if response.is_success:
                        return response
                    error = self._error_for(response, call)
            delay = self.retry.delay(attempt, error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    async def _request(self, call: Call, cls: type[M]) -> M:
        return parse(await self._send(call, stream=False), cls, call.request_id)

    async def _stream(self, call: Call, cls: type[M]) -> AsyncStream[M]:
        return AsyncStream(await self._send(call, stream=True), cls, call.request_id)

    async def _create(
        self,
        path: str,
        fields: Mapping[str, Any],
        params: Mapping[str, Any],
        stream: bool,
        cls: type[M],
        chunk: type[C],
    ) -> M | AsyncStream[C]:
        """A completion route: the ``cls`` answer, or with ``stream`` a stream of ``chunk`` objects."""
        body = request_body({**fields, "stream": True if stream else None}, params)
        call = self._call("POST", path, body, params, stream)
        if stream:
            return await self._stream(call, chunk)
        return await self._request(call, cls)


class _Resource:
    """A group of routes (``client.chat.completions``, ``client.models``) that calls through its client."""

    def __init__(self, client: AsyncAlignPro) -> None:
        self._client = client


class ChatCompletions(_Resource):
    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Messages,
        stream: Literal[False] = False,
        **params: Unpack[ChatParams],
    ) -> ChatCompletion: ...

    @overload
    async def create(
        self, *, model: str, messages: Messages, stream: Literal[True], **params: Unpack[ChatParams]
    ) -> AsyncStream[ChatCompletionChunk]: ...

    @overload
    async def create(
        self, *, model: str, messages: Messages, stream: bool, **params: Unpack[ChatParams]
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]: ...

    async def create(
        self, *, model: str, messages: Messages, stream: bool = False, **params: Unpack[ChatParams]
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """``POST /v1/chat/completions``; ``stream=True`` returns a :class:`AsyncStream` of chunks."""
        fields = {"model": model, "messages": messages}
        return await self._client._create(
            "chat/completions", fields, params, stream, ChatCompletion, ChatCompletionChunk
        )


class Chat:
    def __init__(self, client: AsyncAlignPro) -> None:
        self.completions = ChatCompletions(client)


class Completions(_Resource):
    @overload
    async def create(
        self,
        *,
        model: str,
        prompt: str | Sequence[str],
        stream: Literal[False] = False,
        **params: Unpack[CompletionParams],
    ) -> Completion: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        prompt: str | Sequence[str],
        stream: Literal[True],
        **params: Unpack[CompletionParams],
    ) -> AsyncStream[Completion]: ...

    @overload
    async def create(
        self, *, model: str, prompt: str | Sequence[str], stream: bool, **params: Unpack[CompletionParams]
    ) -> Completion | AsyncStream[Completion]: ...

    async def create(
        self,
        *,
        model: str,
        prompt: str | Sequence[str],
        stream: bool = False,
        **params: Unpack[CompletionParams],
    ) -> Completion | AsyncStream[Completion]:
        """``POST /v1/completions``; ``stream=True`` returns a :class:`AsyncStream` of completion chunks."""
        fields = {"model": model, "prompt": prompt}
        return await self._client._create("completions", fields, params, stream, Completion, Completion)


class Models(_Resource):
    async def list(self, **options: Unpack[RequestOptions]) -> ModelList:
        """``GET /v1/models``: the aliases the gateway serves."""
        return await self._client._request(self._client._call("GET", "models", None, options), ModelList)
