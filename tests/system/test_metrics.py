"""Bounded metrics: random paths and model names add no series to ``/metrics``; the new histograms are there.

The gateway runs in this process over ``httpx.ASGITransport`` (its middleware, routes and metrics as served)
in front of the FaultInjector, a real HTTP upstream on loopback.
"""

from __future__ import annotations

import random
import string
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from alignpro.server.app import create_app
from alignpro.settings import Settings
from alignpro.testing.faults import FaultInjector

KEY = "sk-metrics-0f3c"
AUTH = {"authorization": f"Bearer {KEY}"}


@asynccontextmanager
async def _gateway(faults: FaultInjector) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        engines={"fi": {"kind": "openai", "urls": [faults.url], "model": "ok"}},
        aliases={"plain": {"engine": "fi", "prompter": {"mode": "off"}}},
        api_keys=[KEY],
    )
    app = create_app(settings)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")
    async with app.router.lifespan_context(app), http:
        yield http


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits + "-_.", k=rng.randint(1, 24)))


def _kinds(rng: random.Random) -> list[Callable[[httpx.AsyncClient], Any]]:
    """Each kind of request a scanner or a careless client sends, with random names in it."""

    def chat(model: str, headers: dict[str, str]) -> Callable[[httpx.AsyncClient], Any]:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        return lambda c: c.post("/v1/chat/completions", json=body, headers=headers)

    return [
        lambda c: c.get(f"/{_word(rng)}/{_word(rng)}", headers=AUTH),  # unknown path, with a key
        lambda c: c.post(f"/v1/{_word(rng)}", json={}, headers=AUTH),  # unknown /v1 path
        lambda c: c.get(f"/v1/models/{_word(rng)}"),  # unknown path, no key
        chat(_word(rng), AUTH),  # unknown model: 404
        chat(_word(rng), {}),  # unknown model, no key: 401 before the body is read
        chat("plain", AUTH),  # a real request
        lambda c: c.post("/v1/completions", json={"model": _word(rng), "prompt": 3}, headers=AUTH),  # 422
    ]


def series(text: str) -> set[str]:
    """The series of a Prometheus text exposition: every sample's name and labels."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


async def _send(c: httpx.AsyncClient, rng: random.Random, n: int) -> None:
    for i in range(n):
        kinds = _kinds(rng)
        r = await kinds[i % len(kinds)](c)
        assert r.status_code < 500, r.text


async def test_random_paths_and_models_add_no_series(faults: FaultInjector) -> None:
    rng = random.Random(13)
    async with _gateway(faults) as c:
        await _send(c, rng, 70)  # every kind of request ten times: each series it makes exists now
        await c.get("/metrics", headers=AUTH)  # and the scrape's own
        before = series((await c.get("/metrics", headers=AUTH)).text)
        await _send(c, rng, 1000)
        after = series((await c.get("/metrics", headers=AUTH)).text)
    print(f"series: {len(before)} before, {len(after)} after 1000 random requests")
    assert after == before, sorted(after - before)[:20]
    routes = {s.split('route="')[1].split('"')[0] for s in after if s.startswith("alignpro_requests_total")}
    aliases = {s.split('alias="')[1].split('"')[0] for s in after if s.startswith("alignpro_requests_total")}
    assert routes == {"/v1/chat/completions", "/v1/completions", "/metrics", "unrouted"}, routes
    assert aliases == {"", "plain", "unknown"}, aliases


async def test_latency_histograms_and_process_metrics(faults: FaultInjector) -> None:
    async with _gateway(faults) as c:
        body = {"model": "plain", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        r = await c.post("/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        text = (await c.get("/metrics", headers=AUTH)).text
    names = series(text)
    assert 'alignpro_time_to_first_token_seconds_count{alias="plain"}' in names
    assert 'alignpro_stage_seconds_count{alias="plain",stage="frozen"}' in names
    assert "process_resident_memory_bytes" in names and "process_cpu_seconds_total" in names
    assert any(n.startswith("python_gc_collections_total") for n in names)
    assert "# TYPE alignpro_prompter_seconds histogram" in text
