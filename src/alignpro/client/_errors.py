"""The exceptions :mod:`alignpro.client` raises, documented in one place.

Every error the client raises is an :class:`APIError`. It carries the OpenAI error fields the gateway sent
(``message``, ``type``, ``param``, ``code``), the HTTP ``status`` (``None`` when no answer arrived) and the
``request_id`` (the gateway's ``x-request-id``; the client sends one with every request, so it is known even
when the connection failed). The classes mirror the gateway's statuses (:mod:`alignpro.errors`) and carry the
names openai-python uses, so code that branches on one reads the same with the other::

    APIError                            message, type, param, code, status, request_id, body
    ├── APIStatusError                  the gateway answered a status >= 400 (``response`` is the httpx response)
    │   ├── BadRequestError             400  invalid request; context_length_exceeded, invalid_json
    │   ├── AuthenticationError         401  missing or wrong API key                         (not retried)
    │   ├── PermissionDeniedError       403  the key may not use this model / mode override
    │   ├── NotFoundError               404  unknown model alias or route
    │   ├── PayloadTooLargeError        413  the body is over the gateway's limit
    │   ├── UnprocessableEntityError    422  wrong types, missing or out-of-range fields (param names it)
    │   ├── RateLimitError              429  ``retry_after`` seconds, from Retry-After        (retried)
    │   └── InternalServerError         5xx                                                   (retried)
    │       ├── BadGatewayError         502  the upstream model server failed
    │       ├── ServiceUnavailableError 503  no healthy upstream / prompter down under fail-closed
    │       └── GatewayTimeoutError     504  a stage ran past its timeout
    ├── APIStreamError                  an error event inside a stream that had started (never retried)
    ├── APIConnectionError              no answer: connection refused or reset (code connection_error,
    │   │                               retried), a stream cut off (code stream_interrupted, not retried)
    │   └── APITimeoutError             past the timeout: code connect_timeout or pool_timeout (nothing was
    │                                   sent: retried), read_timeout or write_timeout (the gateway may be
    │                                   generating already: not retried, which would double its work)
    └── APIResponseValidationError      a 2xx answer that is not the typed response it should be

``code`` of the client-side errors says what happened; ``retryable()`` in :mod:`alignpro.client._base` is the
one place that decides what is sent again. Other statuses map to the nearest class (any other 4xx: :class:`APIStatusError`; any 5xx:
:class:`InternalServerError`).
"""

from __future__ import annotations

from typing import Any

import httpx


class APIError(Exception):
    """Base of every client error."""

    def __init__(
        self,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.status = status
        self.request_id = request_id
        self.body = body

    def __str__(self) -> str:
        detail = ", ".join(
            f"{k}={v}"
            for k, v in (("status", self.status), ("code", self.code), ("request_id", self.request_id))
            if v is not None
        )
        return f"{self.message} ({detail})" if detail else self.message


class APIStatusError(APIError):
    """The gateway answered with an error status."""

    status: int

    def __init__(self, message: str, *, response: httpx.Response, **kw: Any) -> None:
        super().__init__(message, status=response.status_code, **kw)
        self.response = response


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class PayloadTooLargeError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    def __init__(self, message: str, *, response: httpx.Response, **kw: Any) -> None:
        super().__init__(message, response=response, **kw)
        self.retry_after = retry_after(response.headers)


class InternalServerError(APIStatusError):
    pass


class BadGatewayError(InternalServerError):
    pass


class ServiceUnavailableError(InternalServerError):
    pass


class GatewayTimeoutError(InternalServerError):
    pass


class APIStreamError(APIError):
    pass


class APIConnectionError(APIError):
    pass


class APITimeoutError(APIConnectionError):
    pass


class APIResponseValidationError(APIError):
    pass


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    502: BadGatewayError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}


def error_fields(body: Any) -> dict[str, Any]:
    """``message, type, param, code`` from an OpenAI error body (``{"error": {...}}``), as far as present."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, str):  # some servers answer {"error": "text"}
        return {"message": err}
    if not isinstance(err, dict):
        return {}
    out: dict[str, Any] = {}
    for key in ("message", "type", "param", "code"):
        value = err.get(key)
        # vLLM puts the status number in "code"; keep every field a string as OpenAI's are.
        out[key] = None if value is None else str(value)
    return out


def status_error(response: httpx.Response, request_id: str | None) -> APIStatusError:
    """The exception for an error response whose body has been read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text or None
    fields = error_fields(body)
    message = fields.pop("message", None) or f"HTTP {response.status_code} {response.reason_phrase}".strip()
    status = response.status_code
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    rid = response.headers.get("x-request-id") or request_id
    return cls(message, response=response, request_id=rid, body=body, **fields)


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), if present."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils
    import time

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_TIMEOUT_CODES: dict[type[httpx.TimeoutException], str] = {
    httpx.ConnectTimeout: "connect_timeout",
    httpx.PoolTimeout: "pool_timeout",
    httpx.WriteTimeout: "write_timeout",
}


def transport_error(exc: httpx.HTTPError, request_id: str | None, streaming: bool = False) -> APIError:
    """The exception for an httpx failure: no answer, or a stream that broke off."""
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        code = _TIMEOUT_CODES.get(type(exc), "read_timeout")
        return APITimeoutError(f"the request timed out ({what})", code=code, request_id=request_id)
    if streaming:
        return APIConnectionError(
            f"the stream broke off ({what})", code="stream_interrupted", request_id=request_id
        )
    return APIConnectionError(
        f"could not reach the gateway ({what})", code="connection_error", request_id=request_id
    )
