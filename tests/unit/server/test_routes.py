"""The routes are module-level and read what they serve from ``app.state``: two apps never share a gateway."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from alignpro.server import routes
from alignpro.server.app import create_app
from alignpro.server.shutdown import Drain
from alignpro.settings import Settings


def _app(*aliases: str, drain: Drain | None = None) -> FastAPI:
    # An upstream nobody listens on: these routes never reach it.
    engines = {"up": {"kind": "openai", "urls": ["http://127.0.0.1:9/v1"], "model": "m"}}
    settings = Settings(
        engines=engines, aliases={a: {"engine": "up", "prompter": {"mode": "off"}} for a in aliases}
    )
    return create_app(settings, drain=drain)


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    )  # an open gateway answers loopback names


async def test_each_app_serves_its_own_gateway() -> None:
    a, b = _app("one"), _app("two", "three")
    assert a.state.gateway is not b.state.gateway
    assert a.state.metrics is a.state.gateway.metrics and a.state.settings.aliases.keys() == {"one"}
    async with _client(a) as ca, _client(b) as cb:
        assert [m["id"] for m in (await ca.get("/v1/models")).json()["data"]] == ["one"]
        assert [m["id"] for m in (await cb.get("/v1/models")).json()["data"]] == ["two", "three"]
        # Counted in each app's own registry.
        assert (
            b'alignpro_requests_total{alias="",route="/v1/models",status="200"} 1.0'
            in (await ca.get("/metrics")).content
        )


async def test_ready_reads_the_drain_of_its_app() -> None:
    drain = Drain()
    app = _app("one", drain=drain)
    async with _client(app) as c:
        assert (await c.get("/health")).json() == {"status": "ok"}
        drain.begin()
        r = await c.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert (await c.get("/health")).status_code == 200


async def test_the_body_limit_comes_from_the_app_settings() -> None:
    app = _app("one")
    app.state.settings = app.state.settings.model_copy(update={"max_body_bytes": 1024})
    async with _client(app) as c:
        r = await c.post(
            "/v1/chat/completions", content=b"x" * 2048, headers={"content-type": "application/json"}
        )
        assert r.status_code == 413


@pytest.mark.parametrize("model", routes.BODY_MODELS)
def test_the_openapi_schema_names_each_request_body(model: type) -> None:
    schema = _app("one").openapi()
    assert model.__name__ in schema["components"]["schemas"]
