"""The audit trail: one JSON line per request (who, which alias, what the prompter did and why, digests of the
prompts, per-stage latencies, status), the request id sent upstream, and OpenTelemetry spans when configured.

The gateway runs in this process over ``httpx.ASGITransport`` (or as a real ``alignpro serve`` process for the
log format) in front of the FaultInjector, a real HTTP upstream whose ``say-<text>`` models script the prompter.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from alignpro.server.app import create_app
from alignpro.server.gateway import Gateway
from alignpro.server.tracing import Tracing
from alignpro.settings import Settings
from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import start_gateway

PROMPT = "How does photosynthesis work in plants?"
REWRITE = "Explain step by step how photosynthesis works in green plants."
KEY = "sk-audit-77c1"


def _settings(faults: FaultInjector, **extra: Any) -> Settings:
    def engine(model: str) -> dict[str, Any]:
        return {"kind": "openai", "urls": [faults.url], "model": model}

    return Settings(
        engines={"frozen": engine("ok"), "writer": engine(f"say-{REWRITE}"), "down": engine("status-503")},
        aliases={
            "aligned": {"engine": "frozen", "prompter": {"mode": "reference", "engine": "writer"}},
            "failing": {"engine": "frozen", "prompter": {"mode": "reference", "engine": "down"}},
        },
        api_keys=[KEY],
        rewrite_cache_size=0,
        **extra,
    )


@asynccontextmanager
async def _gateway(settings: Settings, tracing: Tracing | None = None) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, gateway=Gateway(settings, tracing=tracing))
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://localhost",
        headers={"authorization": f"Bearer {KEY}"},
    )
    async with app.router.lifespan_context(app), http:
        yield http


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], **extra}


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "alignpro.audit"]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def test_one_line_per_request_says_what_changed_for_whom(
    faults: FaultInjector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="alignpro.audit")
    async with _gateway(_settings(faults)) as c:
        r = await c.post(
            "/v1/chat/completions", json=_chat("aligned"), headers={"x-request-id": "req-audit-1"}
        )
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-audit-1"
        upstream_ids = [h.get("x-request-id") for h in faults.last_headers[-2:]]
        r = await c.post("/v1/chat/completions", json=_chat("failing", stream=True))
        assert r.status_code == 200
        stream_id = r.headers["x-request-id"]
        r = await c.post(
            "/v1/chat/completions", json=_chat("aligned"), headers={"authorization": "Bearer sk-no"}
        )
        assert r.status_code == 401
        await c.get("/metrics")  # not a model route: no line
    # Both upstream calls of the first request (prompter, then frozen model) carried its id.
    assert upstream_ids == ["req-audit-1", "req-audit-1"]
    rewritten, fallback, refused = _lines(caplog)
    assert rewritten["request_id"] == "req-audit-1" and rewritten["key_id"].startswith("key-")
    assert KEY not in json.dumps(rewritten)
    assert (rewritten["route"], rewritten["alias"], rewritten["mode"], rewritten["status"]) == (
        "/v1/chat/completions",
        "aligned",
        "reference",
        200,
    )
    assert rewritten["outcome"] == "rewritten" and rewritten["reason"] is None
    assert rewritten["original_sha256"] == _sha(PROMPT) and rewritten["sent_sha256"] == _sha(REWRITE)
    assert "original_prompt" not in rewritten and PROMPT not in json.dumps(rewritten)
    assert (
        0 < rewritten["prompter_ms"] <= rewritten["total_ms"]
        and 0 < rewritten["frozen_ms"] <= rewritten["total_ms"]
    )
    # A failed prompter: the original was sent, and why; a stream has its time to first token.
    assert fallback["request_id"] == stream_id and fallback["outcome"] == "fallback"
    assert fallback["reason"] == "prompter_unavailable" and fallback["sent_sha256"] == _sha(PROMPT)
    assert 0 < fallback["ttft_ms"] <= fallback["total_ms"] and fallback["frozen_ms"] > 0
    assert refused["status"] == 401 and refused["key_id"] == "anonymous" and refused["outcome"] is None


async def test_prompts_are_logged_only_when_configured(
    faults: FaultInjector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="alignpro.audit")
    async with _gateway(_settings(faults, audit_log_prompts=True)) as c:
        assert (
            await c.post("/v1/alignpro/rewrite", json={"model": "aligned", "prompt": PROMPT})
        ).status_code == 200
    (line,) = _lines(caplog)
    assert (line["original_prompt"], line["sent_prompt"], line["outcome"]) == (PROMPT, REWRITE, "rewritten")
    assert line["route"] == "/v1/alignpro/rewrite" and line["frozen_ms"] is None


async def test_spans_for_the_gateway_the_prompter_and_the_frozen_model(faults: FaultInjector) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with _gateway(_settings(faults), Tracing(provider)) as c:
        assert (await c.post("/v1/chat/completions", json=_chat("aligned"))).status_code == 200
        traceparent = faults.last_headers[-1].get("traceparent")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server = spans["POST /v1/chat/completions"]
    prompter, frozen = spans["alignpro.prompter"], spans["alignpro.frozen"]
    calls = [s for s in exporter.get_finished_spans() if s.name == "POST" and s.parent is not None]
    assert prompter.parent is not None and prompter.parent.span_id == server.context.span_id
    assert frozen.parent is not None and frozen.parent.span_id == server.context.span_id
    # The engines' HTTP calls (httpx instrumentation), one inside each stage.
    assert sorted(s.parent.span_id for s in calls if s.parent) == sorted(
        [prompter.context.span_id, frozen.context.span_id]
    )
    assert prompter.attributes is not None and prompter.attributes["outcome"] == "rewritten"
    # One trace (the engines' start-up calls, GET /models, are traces of their own).
    assert {s.context.trace_id for s in (prompter, frozen, *calls)} == {server.context.trace_id}
    # The trace goes upstream too (W3C traceparent), so vLLM's spans can join it.
    assert traceparent is not None and f"{server.context.trace_id:032x}" in traceparent


def test_tracing_is_off_by_default(faults: FaultInjector) -> None:
    gw = Gateway(_settings(faults))
    assert gw.settings.tracing == "off" and gw.tracing.provider is None and gw.tracing.tracer is None


def test_the_served_log_has_one_bare_json_line_per_request(faults: FaultInjector, tmp_path: Path) -> None:
    config = f"""
engines:
  fi: {{kind: openai, urls: ["{faults.url}"], model: ok}}
aliases:
  plain: {{engine: fi, prompter: {{mode: "off"}}}}
"""
    server, url = start_gateway(tmp_path, config, timeout=120)
    try:
        for i in range(3):
            r = httpx.post(
                f"{url}/v1/chat/completions", json=_chat("plain"), headers={"x-request-id": f"line-{i}"}
            )
            assert r.status_code == 200
        httpx.get(f"{url}/health")
    finally:
        server.stop()
    lines = [json.loads(x) for x in server.log_text().splitlines() if x.startswith('{"event": "request"')]
    assert [x["request_id"] for x in lines] == ["line-0", "line-1", "line-2"]
    assert all(x["outcome"] == "off" and x["status"] == 200 for x in lines)
