"""The exceptions AlignPro raises, documented in one place.

Every error a caller can see is an :class:`AlignProError`. Each class fixes the HTTP status and the OpenAI
error ``type`` the gateway answers with; ``code`` and ``param`` say more where useful. The gateway turns any of
them into ``{"error": {"message", "type", "param", "code"}}`` in one function
(:func:`alignpro.server.errors.error_response`); anything else escaping a handler is a bug and is answered as a
500 without internals.

    AlignProError
    ├── ConfigError                 settings or files that cannot work (raised at start-up, not per request)
    ├── InvalidRequestError         400  the request is well-formed JSON but cannot be served as asked
    │   ├── ContextLengthError      400  prompt + max_tokens exceed the model's context (code context_length_exceeded)
    │   └── ValidationFailed        422  wrong types, missing or out-of-range fields (param names the field)
    ├── AuthenticationError         401  missing or wrong API key
    ├── PermissionDeniedError       403  the key may not use this model
    ├── NotFoundError               404  unknown model alias or route
    ├── RequestTimeoutError         408  the client took too long to send its request body
    ├── PayloadTooLargeError        413  the body is over the configured limit
    ├── UnsupportedMediaTypeError   415  a request body that is not declared as JSON
    ├── RateLimitError              429  too many requests for this key (retry_after seconds)
    ├── UpstreamError               502  the upstream answered with garbage or an unexpected status
    │   └── UpstreamStatusError     (status of the upstream)  a 4xx from the upstream, relayed as-is
    ├── UpstreamUnavailableError    503  no healthy upstream / the prompter is down under fail-closed
    └── UpstreamTimeoutError        504  a stage ran past its timeout
"""

from __future__ import annotations

from typing import Any, ClassVar


class AlignProError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    @property
    def status_code(self) -> int:
        return self.status

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ConfigError(AlignProError):
    type = "configuration_error"


class InvalidRequestError(AlignProError):
    status = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    default_code = "context_length_exceeded"


class ValidationFailed(InvalidRequestError):
    status = 422
    default_code = "invalid_value"


class AuthenticationError(AlignProError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(AlignProError):
    status = 403
    type = "permission_error"
    default_code = "model_not_allowed"


class NotFoundError(AlignProError):
    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class RequestTimeoutError(AlignProError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class UnsupportedMediaTypeError(AlignProError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class PayloadTooLargeError(AlignProError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimitError(AlignProError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after
        self.headers.setdefault("retry-after", str(max(1, round(retry_after + 0.4999))))


class UpstreamError(AlignProError):
    status = 502
    type = "upstream_error"
    default_code = "bad_gateway"


class UpstreamStatusError(UpstreamError):
    """A client error answered by the upstream (e.g. vLLM's 400 for a too-long prompt), relayed with its status."""

    def __init__(self, status: int, body: dict[str, Any] | None, message: str) -> None:
        err = (body or {}).get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        super().__init__(str(err.get("message") or message), param=err.get("param"), code=err.get("code"))
        self.upstream_status = status
        self.upstream_type = str(err.get("type") or "invalid_request_error")

    @property
    def status_code(self) -> int:
        return self.upstream_status

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["error"]["type"] = self.upstream_type
        return d


class UpstreamUnavailableError(AlignProError):
    status = 503
    type = "service_unavailable"
    default_code = "upstream_unavailable"


class UpstreamTimeoutError(AlignProError):
    status = 504
    type = "timeout_error"
    default_code = "upstream_timeout"
