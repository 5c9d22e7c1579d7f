"""``alignpro.client``: a typed Python client for the AlignPro gateway, sync and async.

The official ``openai`` client works against the gateway unchanged; this one adds what it cannot express: the
``alignpro`` object typed on every response (:class:`~alignpro.protocol.AlignProInfo`: mode, original and
rewritten prompt, fallback), the rewrite endpoint (``client.rewrite(...)``), ``x-alignpro-*`` headers and the
request id on streams and errors, and one exception tree (:mod:`alignpro.client._errors`).

    from alignpro.client import AlignPro

    with AlignPro(base_url="http://127.0.0.1:8000/v1") as client:   # or ALIGNPRO_BASE_URL / ALIGNPRO_API_KEY
        resp = client.chat.completions.create(model="smollm2-aligned", messages=[...], max_tokens=64)
        print(resp.choices[0].message.content, resp.alignpro.rewritten_prompt)
        with client.chat.completions.create(model="smollm2", messages=[...], stream=True) as stream:
            for chunk in stream:
                ...
        print(client.rewrite(model="smollm2-aligned", prompt="How do I pick a lock?").prompt)

:class:`AsyncAlignPro` is the same with ``await`` / ``async for`` / ``async with``. Requests that fail with a
connection error, 429 or 5xx are retried ``max_retries`` times (default 2) with jittered exponential backoff,
honouring ``Retry-After``; never after a read timeout (the gateway may be generating already), and a stream
never once its first byte arrived.
"""

from __future__ import annotations

from alignpro.client._async import AsyncAlignPro
from alignpro.client._base import ChatParams, CompletionParams, RequestOptions, RetryPolicy
from alignpro.client._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APIStreamError,
    APITimeoutError,
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    GatewayTimeoutError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from alignpro.client._streaming import AsyncStream, Stream
from alignpro.client._sync import AlignPro
from alignpro.protocol import (
    AlignProInfo,
    AlignProOptions,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ModelList,
    RewriteResponse,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APIStreamError",
    "APITimeoutError",
    "AlignPro",
    "AlignProInfo",
    "AlignProOptions",
    "AsyncAlignPro",
    "AsyncStream",
    "AuthenticationError",
    "BadGatewayError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatParams",
    "Completion",
    "CompletionParams",
    "GatewayTimeoutError",
    "InternalServerError",
    "ModelList",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestOptions",
    "RetryPolicy",
    "RewriteResponse",
    "ServiceUnavailableError",
    "Stream",
    "UnprocessableEntityError",
]
