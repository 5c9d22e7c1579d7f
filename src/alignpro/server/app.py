"""The FastAPI app: state, middleware and lifespan around the routes of :mod:`alignpro.server.routes`.

alignpro serve                          # the embedded models on 127.0.0.1:8000
alignpro serve --config gateway.yaml    # e.g. in front of vLLM
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alignpro import __version__
from alignpro.engines.base import REQUEST_ID
from alignpro.errors import AlignProError
from alignpro.server import audit, errors, routes
from alignpro.server.audit import Call
from alignpro.server.auth import HostAllowList
from alignpro.server.connections import RedactQuery, guarded_protocol
from alignpro.server.gateway import Gateway
from alignpro.server.limits import Admission
from alignpro.server.metrics import Metrics
from alignpro.server.shutdown import Drain, GracefulServer
from alignpro.settings import Settings

log = logging.getLogger(__name__)


class Envelope:
    """ASGI middleware: request id, metrics (:meth:`Metrics.count_request`); errors in the OpenAI shape (auth and limits: :class:`Admission`).

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs every request in
    a task group with a memory stream between it and the route, which cost about a third of the gateway's CPU
    per pass-through request (bench/README.md) and re-chunks streamed responses.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, settings: Settings) -> None:
        self.app = app
        self.metrics = metrics
        self.audit = settings.audit_log
        self.audit_prompts = settings.audit_log_prompts

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
        call = Call(rid.decode("latin-1"))
        scope.setdefault("state", {})["call"] = call
        token = REQUEST_ID.set(call.request_id)  # the engines send it upstream
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
            REQUEST_ID.reset(token)
            metrics.inflight.dec()
            route = metrics.count_request(scope, status)
            if self.audit and scope["path"].startswith(("/v1/", "/admin/")):
                audit.write(call, route, status, self.audit_prompts)


def create_app(
    settings: Settings | None = None, gateway: Gateway | None = None, drain: Drain | None = None
) -> FastAPI:
    """The app: its state (what the routes of :mod:`alignpro.server.routes` read), middleware and routes."""
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
    app.state.metrics = gw.metrics
    app.state.drain = drain
    app.state.settings = settings
    errors.install(app)
    gw.tracing.instrument_app(app)
    # Added before Envelope, so it runs inside it: its rejections get a request id and are counted.
    hosts = HostAllowList(settings.allowed_hosts, gw.keys.enabled)
    app.add_middleware(Admission, keys=gw.keys, limiter=gw.limiter, drain=drain, hosts=hosts)
    app.add_middleware(Envelope, metrics=gw.metrics, settings=settings)
    app.include_router(routes.api_router)
    app.include_router(routes.ops_router)
    routes.add_body_schemas(app)
    return app


KEEP_ALIVE_S = 75  # seconds; nginx's default, and above the 60 s idle timeout of common load balancers


def configure_logging(settings: Settings) -> None:
    """The server's log lines (with the process id when several workers write to the same output) and the audit
    trail: one bare JSON object a line, for log shippers to parse as is."""
    pid = " [%(process)d]" if settings.workers > 1 else ""
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s{pid} %(name)s: %(message)s"
    )
    trail = logging.StreamHandler()
    trail.setFormatter(logging.Formatter("%(message)s"))
    audit.log.addHandler(trail)
    audit.log.setLevel(logging.INFO)
    audit.log.propagate = False


def uvicorn_config(settings: Settings, drain: Drain) -> uvicorn.Config:
    """The uvicorn configuration of one server process, around :func:`create_app`."""
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
        # Slow clients: headers within header_timeout_s (bodies: body_timeout_s, in the routes), and a cap on
        # open connections.
        http=guarded_protocol(settings.header_timeout_s),
        limit_concurrency=settings.max_connections,
    )
    # After uvicorn.Config, which sets up uvicorn's loggers.
    logging.getLogger("uvicorn.access").addFilter(RedactQuery())
    return config


def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT: in this process, or in ``settings.workers`` processes under a supervisor
    (:mod:`alignpro.server.workers`). Returns the exit status."""
    configure_logging(settings)
    if settings.workers > 1:
        from alignpro.server.workers import Supervisor

        return Supervisor(settings).run()
    drain = Drain()
    GracefulServer(uvicorn_config(settings, drain), drain).run()
    return 0
