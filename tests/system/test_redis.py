"""Shared state on a real Redis (Debian's redis-server on a free loopback port): a key's rate limit and the
rewrite cache hold across gateway replicas; a new prompter adapter never serves old rewrites; Redis going away
fails no request.

Replicas are real ``alignpro serve`` processes (or, where a test needs to watch the log records, gateways in this
process over ``httpx.ASGITransport``) in front of the FaultInjector, whose ``say-<text>`` models script the
prompter and whose ``roots`` play vLLM's adapter paths in ``/v1/models``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from alignpro.server.app import create_app
from alignpro.settings import Settings
from alignpro.testing.faults import FaultInjector
from alignpro.testing.redis import start_redis
from alignpro.testing.servers import Server, gateway_server

REWRITE = "Explain step by step how photosynthesis works in green plants."
PROMPTER = f"say-{REWRITE}"
KEY = "sk-shared-41aa"
RPM = 30
AUTH = {"authorization": f"Bearer {KEY}"}
OTHER = "sk-other-9d2e"  # unlimited
AUTH_OTHER = {"authorization": f"Bearer {OTHER}"}


def _config(faults: FaultInjector, redis_url: str) -> str:
    return f"""
engines:
  frozen: {{kind: openai, urls: ["{faults.url}"], model: ok}}
  writer: {{kind: openai, urls: ["{faults.url}"], model: "{PROMPTER}"}}
aliases:
  aligned: {{engine: frozen, prompter: {{mode: reference, engine: writer}}}}
  plain: {{engine: frozen, prompter: {{mode: "off"}}}}
redis_url: "{redis_url}"
"""


def _chat(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    server.stop()


@pytest.fixture(scope="module")
def replicas(
    faults: FaultInjector, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    """Two gateway processes on one Redis, the key allowed RPM requests a minute (a bucket of RPM)."""
    tmp = tmp_path_factory.mktemp("replicas")
    env = {"ALIGNPRO_API_KEYS": json.dumps([{"key": KEY, "rate_limit_rpm": RPM}, OTHER])}
    servers = [gateway_server(tmp, _config(faults, redis_url), env=env, name=f"gw{i}") for i in range(2)]
    try:
        for s in servers:
            s.start(timeout=180)
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_two_replicas_share_a_keys_rate_limit(replicas: list[Server]) -> None:
    """3 x RPM requests, alternating between the replicas as fast as they answer: the key gets its RPM (plus what
    the bucket refills meanwhile, RPM/60 a second), not RPM per replica."""
    t0 = time.monotonic()
    with httpx.Client(timeout=10, headers=AUTH) as c:
        codes = [
            c.post(f"{replicas[i % 2].url}/v1/chat/completions", json=_chat("plain", "Hi")).status_code
            for i in range(3 * RPM)
        ]
    took = time.monotonic() - t0
    allowed = codes.count(200)
    print(f"allowed {allowed} of {len(codes)} in {took:.1f} s across 2 replicas; configured {RPM}/min")
    assert set(codes) == {200, 429}, codes
    assert RPM <= allowed <= RPM + 1 + took * RPM / 60, (allowed, took)
    # Both replicas refused some: neither had a bucket of its own.
    assert 429 in codes[0::2] and 429 in codes[1::2]


def test_two_replicas_share_rewrites(replicas: list[Server], faults: FaultInjector) -> None:
    # A key of its own: the limit test above has spent the shared one's bucket.
    prompt = f"How does photosynthesis work? ({time.time_ns()})"
    before = faults.received[PROMPTER]
    with httpx.Client(timeout=60) as c:
        first = c.post(
            f"{replicas[0].url}/v1/chat/completions", json=_chat("aligned", prompt), headers=AUTH_OTHER
        )
        second = c.post(
            f"{replicas[1].url}/v1/chat/completions", json=_chat("aligned", prompt), headers=AUTH_OTHER
        )
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    assert first.headers["x-alignpro-rewritten"] == "true" and "x-alignpro-cache" not in first.headers
    assert second.headers["x-alignpro-cache"] == "hit"
    assert faults.received[PROMPTER] == before + 1  # the second replica did not ask the prompter


# ------------------------------------------------------------------------------------------ in this process
@asynccontextmanager
async def _gateway(faults: FaultInjector, url: str, **extra: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        engines={
            "frozen": {"kind": "openai", "urls": [faults.url], "model": "ok"},
            "writer": {"kind": "openai", "urls": [faults.url], "model": PROMPTER},
        },
        aliases={"aligned": {"engine": "frozen", "prompter": {"mode": "reference", "engine": "writer"}}},
        redis_url=url,
        **extra,
    )
    app = create_app(settings)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")
    async with app.router.lifespan_context(app), http:
        yield http


async def test_a_new_adapter_never_serves_old_rewrites(faults: FaultInjector, redis_url: str) -> None:
    """The cache key holds the prompter's fingerprint: the path vLLM loaded the adapter from (its ``root``)."""
    prompt = f"How do plants make sugar? ({time.time_ns()})"
    calls = faults.received[PROMPTER]
    faults.roots[PROMPTER] = "/adapters/prompter-v1"
    try:
        async with _gateway(faults, redis_url) as v1:
            assert (await v1.post("/v1/chat/completions", json=_chat("aligned", prompt))).status_code == 200
        faults.roots[PROMPTER] = "/adapters/prompter-v2"
        async with _gateway(faults, redis_url) as v2:
            r = await v2.post("/v1/chat/completions", json=_chat("aligned", prompt))
        assert r.status_code == 200 and "x-alignpro-cache" not in r.headers
        assert faults.received[PROMPTER] == calls + 2  # v2 asked its own prompter
        faults.roots[PROMPTER] = "/adapters/prompter-v1"
        async with _gateway(faults, redis_url) as v1_again:
            r = await v1_again.post("/v1/chat/completions", json=_chat("aligned", prompt))
        assert r.headers.get("x-alignpro-cache") == "hit"  # a gateway on v1 still shares v1's rewrites
    finally:
        faults.roots.pop(PROMPTER)


async def test_redis_going_away_fails_no_request(
    faults: FaultInjector, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="alignpro.server.shared")
    redis, url = start_redis(tmp_path)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    keys = [{"key": KEY, "rate_limit_rpm": 600}]
    try:
        async with _gateway(faults, url, api_keys=keys, redis_retry_s=0.5) as c:

            async def ask(i: int) -> httpx.Response:
                r = await c.post(
                    "/v1/chat/completions",
                    json=_chat("aligned", f"How does photosynthesis work in plants? ({i})"),
                    headers=AUTH,
                )
                assert r.status_code == 200, r.text
                return r

            for i in range(3):
                await ask(i)
            redis.stop()  # mid-run
            for i in range(3, 13):
                await ask(i)
            # The local cache took over: a repeat is a hit even without Redis.
            assert (await ask(12)).headers.get("x-alignpro-cache") == "hit"
            redis, _ = start_redis(tmp_path, port=port)
            time.sleep(0.6)  # past redis_retry_s
            for i in range(13, 16):
                await ask(i)
    finally:
        redis.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "alignpro.server.shared"]
    went = [m for m in messages if "does not answer" in m]
    back = [m for m in messages if "is back after" in m]
    assert len(went) == 1 and len(back) == 1, messages
    assert [r.levelname for r in caplog.records if "does not answer" in r.getMessage()] == ["WARNING"]
