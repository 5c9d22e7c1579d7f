"""One place that turns exceptions into OpenAI-shaped error responses."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignpro.errors import AlignProError, ValidationFailed

log = logging.getLogger(__name__)


def validation_error(exc: ValidationError | RequestValidationError) -> ValidationFailed:
    """The first pydantic error as a 422 naming the field (``messages.0.role``)."""
    errors = exc.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request"))
    extra = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return ValidationFailed(f"{param}: {msg}{extra}" if param else msg + extra, param=param)


def error_response(exc: BaseException) -> Response:
    if isinstance(exc, (ValidationError, RequestValidationError)):
        exc = validation_error(exc)
    if isinstance(exc, AlignProError):
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)
    if isinstance(exc, StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": code}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))
    log.error("unhandled error", exc_info=exc)
    body = {"error": {"message": "internal error", "type": "internal_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=500)


def install(app: FastAPI) -> None:
    async def handler(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    for kind in (AlignProError, RequestValidationError, ValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handler)


# OpenAI request bodies nest a handful of levels (tool schemas a few more); a ~1,000-level body exhausts the
# recursion of whatever walks it next (validation, re-encoding for the upstream).
MAX_JSON_DEPTH = 64


def parse_json(body: bytes) -> Any:
    """The request body as JSON, refused (400) when it is not JSON, nests deeper than :data:`MAX_JSON_DEPTH`, or
    holds a string that is not valid Unicode (a lone surrogate escape, which no encoder downstream accepts)."""
    from alignpro.errors import InvalidRequestError

    try:
        data = json.loads(body)
        problem = _check_tree(data)
    except RecursionError:
        problem = "too_deep"
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if problem == "too_deep":
        raise InvalidRequestError(
            f"the request body nests more than {MAX_JSON_DEPTH} levels deep", code="invalid_json"
        )
    if problem is not None:
        raise InvalidRequestError(
            f"the request body holds an invalid Unicode string (a lone surrogate) at {problem}",
            code="invalid_unicode",
        )
    return data


def _check_tree(data: Any) -> str | None:
    """'too_deep', the path of the first string that cannot be encoded, or None; iterative (no recursion)."""
    todo: list[tuple[Any, int, str]] = [(data, 0, "")]
    while todo:
        node, depth, path = todo.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode()
                except UnicodeEncodeError:
                    return path or "the top level"
        elif isinstance(node, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return "too_deep"
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                sub = f"{path}.{k}" if path else str(k)
                todo.append((v, depth + 1, sub))
                if isinstance(k, str):
                    todo.append((k, depth + 1, sub))
    return None
