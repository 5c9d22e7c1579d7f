"""What the sync and async clients share: configuration, request bodies, retries, response parsing.

:class:`~alignpro.client.AlignPro` and :class:`~alignpro.client.AsyncAlignPro` differ only in how they wait
for I/O; every decision (which URL, which headers, whether and when to retry, how an answer becomes a typed
object or an exception) is made here once.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from typing_extensions import TypedDict

from alignpro import __version__
from alignpro.client._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    RateLimitError,
    retry_after,
    status_error,
)
from alignpro.protocol import AlignProOptions, ChatMessage, ResponseFormat, StreamOptions, Tool

M = TypeVar("M", bound=BaseModel)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
# Generation on a CPU can take minutes; connecting should not.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2

Timeout: TypeAlias = "float | httpx.Timeout"
Messages: TypeAlias = "Sequence[ChatMessage | Mapping[str, Any]]"


class RequestOptions(TypedDict, total=False):
    """Per-call options every method accepts."""

    extra_headers: Mapping[str, str]
    """Sent as well (an ``x-request-id`` here replaces the generated one)."""
    extra_body: Mapping[str, Any]
    """Merged into the JSON body: upstream extras such as vLLM's ``top_k``."""
    timeout: Timeout
    """This call's timeout, instead of the client's."""


class _SamplingParams(RequestOptions, total=False):
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: str | Sequence[str]
    seed: int
    presence_penalty: float
    frequency_penalty: float
    user: str
    stream_options: StreamOptions | Mapping[str, Any]
    alignpro: AlignProOptions | Mapping[str, Any]
    """The AlignPro extension: ``{"mode": ..., "contract": ...}`` for this request."""


class ChatParams(_SamplingParams, total=False):
    """Optional parameters of ``chat.completions.create`` (the OpenAI ones the gateway accepts)."""

    max_completion_tokens: int
    logprobs: bool
    top_logprobs: int
    tools: Sequence[Tool | Mapping[str, Any]]
    """Function tools; the model's calls come back in ``message.tool_calls`` (stream: ``delta.tool_calls``)."""
    tool_choice: str | Mapping[str, Any]
    parallel_tool_calls: bool
    response_format: ResponseFormat | Mapping[str, Any]
    """``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``: JSON output."""


class CompletionParams(_SamplingParams, total=False):
    """Optional parameters of ``completions.create``."""

    logprobs: int
    echo: bool
    suffix: str


_OPTION_KEYS = RequestOptions.__optional_keys__


@dataclass(frozen=True)
class Call:
    """One logical request; retries send it again with the same ``x-request-id``."""

    method: Literal["GET", "POST"]
    url: str
    headers: dict[str, str]
    json: dict[str, Any] | None
    timeout: httpx.Timeout

    @property
    def request_id(self) -> str:
        return self.headers["x-request-id"]


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff: ``min(initial * 2**attempt, max_delay)``, minus up to 25 %.

    A ``Retry-After`` (or ``retry-after-ms``) from the gateway is used as it is, when it is at most
    ``max_retry_after`` seconds; a longer one is not waited for: the error is raised for the caller to decide.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, error: APIError) -> float | None:
        """Seconds to wait before retry number ``attempt + 1`` after ``error``; ``None``: do not retry."""
        if attempt >= self.max_retries or not retryable(error):
            return None
        if isinstance(error, APIStatusError):
            asked = retry_after(error.response.headers)
            if asked is not None:
                return asked if asked <= self.max_retry_after else None
        # Jitter spreads the retries of many clients that failed together.
        return min(self.initial_delay * 2**attempt, self.max_delay) * (1 - 0.25 * random.random())


def retryable(error: APIError) -> bool:
    """What may succeed when sent again unchanged, without running a generation twice: connection errors,
    timeouts before anything was sent, 429 and 5xx."""
    if isinstance(error, APITimeoutError):
        return error.code in ("connect_timeout", "pool_timeout")
    if isinstance(error, APIConnectionError):
        return True
    return isinstance(error, APIStatusError) and (isinstance(error, RateLimitError) or error.status >= 500)


def normalise_base_url(url: str) -> str:
    """``http://host:8000`` and ``http://host:8000/v1/`` both mean ``http://host:8000/v1``."""
    url = url.rstrip("/")
    if httpx.URL(url).path in ("", "/"):
        url += "/v1"
    return url


def _jsonable(value: Any) -> Any:
    if isinstance(value, ChatMessage):  # e.g. a response's assistant message with its tool calls, as received
        return value.wire()
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def request_body(fields: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body: required fields, then the optional parameters given, then ``extra_body``."""
    body = {k: _jsonable(v) for k, v in fields.items() if v is not None}
    body.update({k: _jsonable(v) for k, v in params.items() if k not in _OPTION_KEYS and v is not None})
    body.update(_jsonable(params.get("extra_body") or {}))
    return body


def parse(response: httpx.Response, cls: type[M], request_id: str) -> M:
    """A 2xx JSON body as the typed response model."""
    rid = response.headers.get("x-request-id") or request_id
    try:
        return cls.model_validate(response.json())
    except (ValueError, ValidationError) as exc:
        raise APIResponseValidationError(
            f"the gateway's answer is not a {cls.__name__}: {exc}",
            status=response.status_code,
            request_id=rid,
            body=response.text[:2000],
        ) from exc


class BaseClient:
    """Configuration shared by the twins (whose signatures hold the defaults).

    ``base_url`` defaults to ``ALIGNPRO_BASE_URL``, then ``http://127.0.0.1:8000/v1``; ``api_key`` to
    ``ALIGNPRO_API_KEY`` (none: no ``Authorization`` header, for an open gateway).
    """

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str | None,
        timeout: Timeout,
        max_retries: int,
        default_headers: Mapping[str, str] | None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = normalise_base_url(
            base_url or os.environ.get("ALIGNPRO_BASE_URL") or DEFAULT_BASE_URL
        )
        self.api_key = api_key if api_key is not None else os.environ.get("ALIGNPRO_API_KEY")
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.retry = RetryPolicy(max_retries=max_retries)
        self.default_headers = dict(default_headers or {})

    @property
    def max_retries(self) -> int:
        return self.retry.max_retries

    def _call(
        self,
        method: Literal["GET", "POST"],
        path: str,
        body: dict[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        stream: bool = False,
    ) -> Call:
        options = options or {}
        headers = {
            "accept": "text/event-stream" if stream else "application/json",
            "user-agent": f"alignpro-python/{__version__}",
            "x-request-id": uuid.uuid4().hex,
            **self.default_headers,
        }
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        headers.update(options.get("extra_headers") or {})
        timeout = options.get("timeout")
        if timeout is None:
            timeout = self.timeout
        elif not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout)
        return Call(method, f"{self.base_url}/{path.lstrip('/')}", headers, body, timeout)

    def _build(self, http: httpx.Client | httpx.AsyncClient, call: Call) -> httpx.Request:
        return http.build_request(
            call.method, call.url, headers=call.headers, json=call.json, timeout=call.timeout
        )

    @staticmethod
    def _error_for(response: httpx.Response, call: Call) -> APIStatusError:
        return status_error(response, call.request_id)
