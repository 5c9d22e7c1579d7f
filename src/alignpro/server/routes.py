"""The gateway's HTTP routes: module-level routers, thin wrappers around :class:`~alignpro.server.gateway.Gateway`.

A handler finds what it serves in ``request.app.state``, which :func:`alignpro.server.app.create_app` fills:
``gateway`` (the :class:`~alignpro.server.gateway.Gateway`), ``metrics``, ``drain`` and ``settings``. So the
routes are defined once, at import, and an app includes them (``app.include_router``) rather than defining
closures over its own objects.

:data:`api_router`: the OpenAI-compatible ``/v1`` routes and ``/v1/alignpro/rewrite``.
:data:`ops_router`: ``/health``, ``/ready`` and ``/metrics``, for load balancers and monitoring.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from alignpro.errors import (
    AlignProError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RequestTimeoutError,
    UnsupportedMediaTypeError,
    UpstreamUnavailableError,
)
from alignpro.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
    ErrorResponse,
    ModelList,
    PrompterSwap,
    PrompterSwapResult,
    ResponsesRequest,
    RewriteRequest,
    RewriteResponse,
    TokenizeRequest,
)
from alignpro.server import errors
from alignpro.server.audit import Call
from alignpro.server.auth import ANONYMOUS, Principal
from alignpro.server.gateway import Gateway, Reply
from alignpro.server.metrics import Metrics
from alignpro.server.shutdown import Drain
from alignpro.settings import Settings

api_router = APIRouter()
ops_router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 408, 413, 415, 422, 429, 502, 503, 504)
}
# The request models of the routes that read their body themselves (see :func:`add_body_schemas`).
BODY_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    CompletionRequest,
    RewriteRequest,
    PrompterSwap,
    ResponsesRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
Body = TypeVar(
    "Body",
    ChatCompletionRequest,
    CompletionRequest,
    RewriteRequest,
    ResponsesRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
Route = TypeVar("Route", bound=Callable[..., Any])


# ------------------------------------------------------------------------------------------- app state
def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _principal(request: Request) -> Principal:
    """The caller :class:`~alignpro.server.limits.Admission` authenticated."""
    return getattr(request.state, "principal", ANONYMOUS)


def _call(request: Request) -> Call:
    """The audit record :class:`~alignpro.server.app.Envelope` opened for this request."""
    call: Call = request.state.call
    return call


# ------------------------------------------------------------------------------------------- bodies
async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading them all, and a client that takes
    over ``timeout_s`` seconds to send it (a slow-body attack holds a connection and its buffers)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the request body is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"the request body is over the {limit}-byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive within {timeout_s:g} s", headers={"connection": "close"}
        ) from None
    return b"".join(chunks)


def _check_json(request: Request) -> None:
    """Bodies must be declared JSON. A web page can send text/plain, form data or an untyped blob to any origin
    without a CORS preflight; only JSON needs one, which this server never grants (cross-site request forgery)."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"the request body must be JSON sent as 'Content-Type: application/json' (got {kind or 'none'!r})"
        )


async def _read(request: Request, model: type[Body]) -> Body:
    """The request body as ``model``; the alias it names is kept for the access log and the metrics."""
    settings: Settings = request.app.state.settings
    _check_json(request)
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    req = model.model_validate(errors.parse_json(body))
    request.state.alias = req.model
    return req


T = TypeVar("T")
CLIENT_GONE = (
    499  # nginx's status for "the client closed the connection before the answer": logged, never sent
)


async def _unless_gone(request: Request, work: Awaitable[T]) -> T | Response:
    """``work``, cancelled when the client disconnects first: the prompter and a non-streaming upstream call stop
    with it (a stream's relay is closed by its own response when the client leaves)."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request was cancelled itself (shutdown): so is its work
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=CLIENT_GONE)


def _respond(reply: Reply) -> Response:
    if reply.stream is not None:
        headers = {**reply.headers, "cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(reply.stream, media_type="text/event-stream", headers=headers)
    return JSONResponse(reply.body, headers=reply.headers)


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself: the schema clients (and fuzzers) see."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def add_body_schemas(app: FastAPI, models: tuple[type[BaseModel], ...] = BODY_MODELS) -> None:
    """Put the request models named by :func:`_body` into the OpenAPI components (no signature names them)."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            _, defs = models_json_schema(
                [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------- /v1
def _post(path: str, body: type[BaseModel], response: type[BaseModel] | None) -> Callable[[Route], Route]:
    """A POST route that reads its ``body`` itself (see :func:`_body`) and answers ``response`` (None: the
    upstream's JSON, relayed)."""
    return api_router.post(path, response_model=response, responses=ERRORS, openapi_extra=_body(body))


@_post("/v1/chat/completions", ChatCompletionRequest, ChatCompletion)
async def chat_completions(request: Request) -> Response:
    req = await _read(request, ChatCompletionRequest)
    reply = await _unless_gone(request, _gateway(request).chat(req, _principal(request), _call(request)))
    return reply if isinstance(reply, Response) else _respond(reply)


@_post("/v1/completions", CompletionRequest, Completion)
async def completions(request: Request) -> Response:
    req = await _read(request, CompletionRequest)
    reply = await _unless_gone(
        request, _gateway(request).completion(req, _principal(request), _call(request))
    )
    return reply if isinstance(reply, Response) else _respond(reply)


@_post("/v1/alignpro/rewrite", RewriteRequest, RewriteResponse)
async def rewrite(request: Request) -> RewriteResponse | Response:
    req = await _read(request, RewriteRequest)
    return await _unless_gone(
        request, _gateway(request).rewrite_only(req, _principal(request), _call(request))
    )


@_post("/v1/responses", ResponsesRequest, None)
async def responses(request: Request) -> Response:
    req = await _read(request, ResponsesRequest)
    return _respond(await _gateway(request).responses(req, _principal(request), _call(request)))


@_post("/v1/embeddings", EmbeddingRequest, None)
async def embeddings(request: Request) -> Response:
    req = await _read(request, EmbeddingRequest)
    answer = await _unless_gone(request, _gateway(request).relay(req, _principal(request)))
    return answer if isinstance(answer, Response) else JSONResponse(answer)


@_post("/tokenize", TokenizeRequest, None)
async def tokenize(request: Request) -> Response:
    req = await _read(request, TokenizeRequest)
    answer = await _unless_gone(request, _gateway(request).relay(req, _principal(request)))
    return answer if isinstance(answer, Response) else JSONResponse(answer)


@api_router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(request: Request) -> ModelList:
    return _gateway(request).models(_principal(request))


# ------------------------------------------------------------------------------------------- operations
@ops_router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@ops_router.get("/ready", responses=ERRORS)
async def ready(request: Request) -> Response:
    drain: Drain = request.app.state.drain
    if drain.draining:
        return errors.error_response(
            UpstreamUnavailableError("the server is shutting down", code="shutting_down")
        )
    try:
        engines = await _gateway(request).ready()
    except AlignProError as exc:
        return errors.error_response(exc)
    return JSONResponse({"status": "ready", "engines": engines})


@ops_router.post(
    "/admin/aliases/{alias}/prompter",
    response_model=PrompterSwapResult,
    responses=ERRORS,
    openapi_extra=_body(PrompterSwap),
)
async def swap_prompter(alias: str, request: Request) -> PrompterSwapResult:
    """Move ``alias`` to another prompter adapter (vLLM's runtime LoRA loading); needs an ``admin`` key. Each gateway
    replica holds its own aliases: call every replica (or roll them with the new adapter in the config)."""
    settings: Settings = request.app.state.settings
    _check_json(request)
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    swap = PrompterSwap.model_validate(errors.parse_json(body))
    request.state.alias = alias  # the metrics label it (a configured alias, else "unknown")
    return await _gateway(request).swap_prompter(alias, swap, _principal(request), _call(request))


@ops_router.get("/metrics", responses=ERRORS)
async def metrics(request: Request) -> Response:
    # The metrics count every alias (and its traffic): a key limited to some aliases is a tenant, not an
    # operator, and must not learn the others.
    if _principal(request).aliases is not None:
        raise PermissionDeniedError(
            "the metrics cover every model: they need a key that is not limited to some models",
            code="metrics_not_allowed",
        )
    served: Metrics = request.app.state.metrics
    return Response(generate_latest(served.registry), media_type=CONTENT_TYPE_LATEST)
