"""The FastAPI app: thin routes over :class:`~alignpro.server.gateway.Gateway`.

alignpro serve                          # the embedded models on 127.0.0.1:8000
alignpro serve --config gateway.yaml    # e.g. in front of vLLM
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from alignpro import __version__
from alignpro.errors import AlignProError, PayloadTooLargeError
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
from alignpro.server.gateway import Gateway, Reply
from alignpro.settings import Settings

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 429, 502, 503, 504)
}


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


def create_app(settings: Settings | None = None, gateway: Gateway | None = None) -> FastAPI:
    settings = settings or Settings()
    gw = gateway or Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.aclose()

    app = FastAPI(title="AlignPro", version=__version__, lifespan=lifespan)
    app.state.gateway = gw
    errors.install(app)

    @app.middleware("http")
    async def envelope(request: Request, call_next: Any) -> Response:
        """Request id, auth (all routes but /health), metrics; errors in the OpenAI shape."""
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        route = request.url.path
        gw.metrics.inflight.inc()
        try:
            if route != "/health":
                gw.authenticate(request.headers.get("authorization"))
            response: Response = await call_next(request)
        except AlignProError as exc:
            response = errors.error_response(exc)
        finally:
            gw.metrics.inflight.dec()
        if response.status_code >= 400:
            gw.metrics.errors.labels(str(response.status_code)).inc()
        gw.metrics.requests.labels(
            route, getattr(request.state, "alias", ""), str(response.status_code)
        ).inc()
        response.headers["x-request-id"] = rid
        return response

    async def parse(request: Request) -> Any:
        return errors.parse_json(await read_body(request, settings.max_body_bytes))

    def respond(reply: Reply) -> Response:
        if reply.stream is not None:
            headers = {**reply.headers, "cache-control": "no-cache", "x-accel-buffering": "no"}
            return StreamingResponse(reply.stream, media_type="text/event-stream", headers=headers)
        return JSONResponse(reply.body, headers=reply.headers)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
    async def chat_completions(request: Request) -> Response:
        req = ChatCompletionRequest.model_validate(await parse(request))
        request.state.alias = req.model
        return respond(await gw.chat(req))

    @app.post("/v1/completions", response_model=Completion, responses=_ERRORS)
    async def completions(request: Request) -> Response:
        req = CompletionRequest.model_validate(await parse(request))
        request.state.alias = req.model
        return respond(await gw.completion(req))

    @app.post("/v1/alignpro/rewrite", response_model=RewriteResponse, responses=_ERRORS)
    async def rewrite(request: Request) -> RewriteResponse:
        req = RewriteRequest.model_validate(await parse(request))
        request.state.alias = req.model
        return await gw.rewrite(req)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return gw.models()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses=_ERRORS)
    async def ready() -> Response:
        try:
            engines = await gw.ready()
        except AlignProError as exc:
            return errors.error_response(exc)
        return JSONResponse({"status": "ready", "engines": engines})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(settings: Settings) -> None:
    import uvicorn

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
