"""The FastAPI app: thin routes over :class:`~alignpro.server.gateway.Gateway`.

alignpro serve                          # the embedded models on 127.0.0.1:8000
alignpro serve --config gateway.yaml    # e.g. in front of vLLM
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alignpro import __version__
from alignpro.errors import AlignProError, PayloadTooLargeError, UpstreamUnavailableError
from alignpro.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelList,
    RewriteRequest,
    RewriteResponse,
)
from alignpro.server import errors
from alignpro.server.auth import ANONYMOUS, Principal
from alignpro.server.gateway import Gateway, Reply
from alignpro.server.limits import Admission
from alignpro.server.metrics import Metrics
from alignpro.server.shutdown import Drain, GracefulServer
from alignpro.settings import Settings

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 429, 502, 503, 504)
}


def _body(model: type[Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself: the schema clients (and fuzzers) see."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def _add_body_schemas(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
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


def _principal(request: Request) -> Principal:
    """The caller :class:`~alignpro.server.limits.Admission` authenticated."""
    return getattr(request.state, "principal", ANONYMOUS)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the request body is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


class Envelope:
    """ASGI middleware: request id, metrics; errors in the OpenAI shape (auth and limits: :class:`Admission`).

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs every request in
    a task group with a memory stream between it and the route, which cost about a third of the gateway's CPU
    per pass-through request (bench/README.md) and re-chunks streamed responses.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value
                break
        rid = rid or uuid.uuid4().hex.encode()
        status = 500  # what an exception that escapes the app becomes
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = [(k, v) for k, v in message.get("headers", ()) if k != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", rid)]
            await send(message)

        metrics = self.metrics
        metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except AlignProError as exc:
            if started:
                raise
            await errors.error_response(exc)(scope, receive, send_with_id)
        finally:
            metrics.inflight.dec()
            if status >= 400:
                metrics.errors.labels(str(status)).inc()
            alias = scope.get("state", {}).get("alias", "")
            metrics.requests.labels(scope["path"], alias, str(status)).inc()


def create_app(
    settings: Settings | None = None, gateway: Gateway | None = None, drain: Drain | None = None
) -> FastAPI:
    settings = settings or Settings()
    gw = gateway or Gateway(settings)
    drain = drain or Drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.aclose()

    app = FastAPI(title="AlignPro", version=__version__, lifespan=lifespan)
    app.state.gateway = gw
    app.state.drain = drain
    errors.install(app)
    # Added before Envelope, so it runs inside it: its rejections get a request id and are counted.
    app.add_middleware(Admission, keys=gw.keys, limiter=gw.limiter, drain=drain)
    app.add_middleware(Envelope, metrics=gw.metrics)

    async def parse(request: Request) -> Any:
        return errors.parse_json(await read_body(request, settings.max_body_bytes))

    def respond(reply: Reply) -> Response:
        if reply.stream is not None:
            headers = {**reply.headers, "cache-control": "no-cache", "x-accel-buffering": "no"}
            return StreamingResponse(reply.stream, media_type="text/event-stream", headers=headers)
        return JSONResponse(reply.body, headers=reply.headers)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses=_ERRORS,
        openapi_extra=_body(ChatCompletionRequest),
    )
    async def chat_completions(request: Request) -> Response:
        req = ChatCompletionRequest.model_validate(await parse(request))
        request.state.alias = req.model
        return respond(await gw.chat(req, _principal(request)))

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses=_ERRORS,
        openapi_extra=_body(CompletionRequest),
    )
    async def completions(request: Request) -> Response:
        req = CompletionRequest.model_validate(await parse(request))
        request.state.alias = req.model
        return respond(await gw.completion(req, _principal(request)))

    @app.post(
        "/v1/alignpro/rewrite",
        response_model=RewriteResponse,
        responses=_ERRORS,
        openapi_extra=_body(RewriteRequest),
    )
    async def rewrite(request: Request) -> RewriteResponse:
        req = RewriteRequest.model_validate(await parse(request))
        request.state.alias = req.model
        return await gw.rewrite(req, _principal(request))

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models(request: Request) -> ModelList:
        return gw.models(_principal(request))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses=_ERRORS)
    async def ready() -> Response:
        if drain.draining:
            return errors.error_response(
                UpstreamUnavailableError("the server is shutting down", code="shutting_down")
            )
        try:
            engines = await gw.ready()
        except AlignProError as exc:
            return errors.error_response(exc)
        return JSONResponse({"status": "ready", "engines": engines})

    _add_body_schemas(app, (ChatCompletionRequest, CompletionRequest, RewriteRequest))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


KEEP_ALIVE_S = 75  # seconds; nginx's default, and above the 60 s idle timeout of common load balancers


def serve(settings: Settings) -> None:
    import uvicorn

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    drain = Drain()
    config = uvicorn.Config(
        create_app(settings, drain=drain),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # SIGTERM: stop listening, let in-flight requests and streams finish for this long, then cancel them.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        # Idle keep-alive connections are kept longer than clients keep them (httpx, openai-python: 5 s), so a
        # client never sends a request on a connection the server is closing at that moment (a lost request).
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    GracefulServer(config, drain).run()
