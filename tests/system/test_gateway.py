"""The gateway end to end: the official openai client against real gateway processes on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import free_port, start_gateway

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_models_lists_the_aliases(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"smollm2-aligned", "smollm2"} <= ids


def test_chat_through_the_prompter(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-aligned",
        messages=[{"role": "user", "content": "Name one colour of the rainbow."}],
        max_tokens=8,
        temperature=0,
    )
    resp = raw.parse()
    assert resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens <= 8
    info = (resp.model_extra or {})["alignpro"]
    assert info["original_prompt"] == "Name one colour of the rainbow."
    assert info["mode"] in ("reference", "adapter")
    # Either the prompter rewrote it, chose to keep it (KEEP), or it says why it fell back to the original.
    assert info["rewritten"] is True or info["kept"] is True or info.get("fallback")
    if info["rewritten"]:
        assert info["rewritten_prompt"]
    assert raw.headers["x-alignpro-mode"] == info["mode"]
    assert float(raw.headers["x-alignpro-prompter-ms"]) >= 0
    assert raw.headers["x-request-id"]


def test_the_default_settings_serve_the_shipped_prompter_merged(gateway_url: str) -> None:
    """`make serve`: the frozen model is the plain embedded engine and the shipped prompter runs as its own model,
    the adapter merged into a copy of the base (no peft adapter switched per batch)."""
    body = {
        "model": "smollm2-aligned",
        "messages": [{"role": "user", "content": "Name a planet."}],
        "max_tokens": 4,
        "temperature": 0,
    }
    before = httpx.get(f"{gateway_url}/ready").json()["engines"]
    r = httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    info = r.json()["alignpro"]
    assert (info["mode"], info["prompter"]) == ("adapter", "prompter/alignpro-prompter"), info
    engines = httpx.get(f"{gateway_url}/ready").json()["engines"]
    assert engines["prompter"]["model"] == "alignpro-prompter"
    # The rewrite was decoded by the merged model's engine (a cached rewrite would decode nothing: the text is new).
    assert engines["prompter"]["rows"] > before["prompter"]["rows"], (before, engines)


def test_chat_stream_ends_with_done_and_reports_usage(gateway_url: str) -> None:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{gateway_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["alignpro"]["mode"] == "off"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage and usage[-1]["completion_tokens"] <= 6


def test_openai_client_streams(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Count to three."}], max_tokens=8, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces)


def test_stream_equals_non_stream_when_greedy(client: openai.OpenAI) -> None:
    args = {"model": "smollm2", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 12}
    full = client.chat.completions.create(temperature=0, **args).choices[0].message.content  # type: ignore[call-overload]
    stream = client.chat.completions.create(temperature=0, stream=True, **args)  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full


def test_completions(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert resp.choices[0].text
    assert resp.model_extra and resp.model_extra["alignpro"]["mode"] == "off"


def test_n_and_stop(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "List three fruits, one per line."}],
        max_tokens=24,
        n=2,
        stop=["\n"],
        seed=7,
    )
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert "\n" not in (choice.message.content or "")


def test_mode_override_per_request(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        extra_body={"alignpro": {"mode": "off"}},
    )
    assert resp.model_extra and resp.model_extra["alignpro"]["mode"] == "off"
    # An aligned alias keeps its prompter unless its operator lists other modes (allowed_modes).
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(
            model="smollm2-aligned",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            extra_body={"alignpro": {"mode": "off"}},
        )
    assert err.value.code == "mode_not_allowed"


@pytest.mark.parametrize(
    ("call", "status", "param"),
    [
        (
            lambda c: c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}]),
            404,
            "model",
        ),
        (lambda c: c.chat.completions.create(model="smollm2", messages=[]), 422, "messages"),
        (
            lambda c: c.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "x"}], n=999
            ),
            422,
            "n",
        ),
        (
            lambda c: c.chat.completions.create(
                model="smollm2",
                messages=[{"role": "wizard", "content": "x"}],
            ),
            422,
            "messages.0.role",
        ),
    ],
)
def test_bad_requests_get_openai_errors(client: openai.OpenAI, call, status: int, param: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.APIStatusError) as err:
        call(client)
    assert err.value.status_code == status
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == param and body["message"]


def test_malformed_json_and_wrong_types(gateway_url: str) -> None:
    r = httpx.post(
        f"{gateway_url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(
        f"{gateway_url}/v1/chat/completions",
        json={"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
        timeout=10,
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"


def test_body_over_the_limit_is_413(gateway_url: str) -> None:
    big = {"model": "smollm2", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    r = httpx.post(f"{gateway_url}/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_prompt_beyond_the_context_is_400(gateway_url: str) -> None:
    long = "hello " * 6000  # ~6000 tokens + 4096 new tokens > 8192 context
    body = {"model": "smollm2", "messages": [{"role": "user", "content": long}], "max_tokens": 4096}
    r = httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_health_ready_metrics(gateway_url: str) -> None:
    assert httpx.get(f"{gateway_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway_url}/ready").json()
    assert ready["status"] == "ready" and ready["engines"]["embedded"]["batches"] >= 0
    text = httpx.get(f"{gateway_url}/metrics").text
    assert "alignpro_requests_total" in text and "alignpro_stage_seconds" in text


# ------------------------------------------------------------------------------- a second gateway in front
@pytest.fixture(scope="module")
def front(gateway_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second gateway whose frozen engine is the first gateway, over HTTP (the `openai` engine)."""
    config = f"""
engines:
  upstream: {{kind: openai, urls: ["{gateway_url}/v1"], model: smollm2}}
aliases:
  relay: {{engine: upstream, prompter: {{mode: off}}}}
"""
    server, url = start_gateway(tmp_path_factory.mktemp("front"), config)
    yield url
    server.stop()


def test_openai_engine_relays_chat_and_usage(front: str) -> None:
    c = openai.OpenAI(base_url=f"{front}/v1", api_key="x", max_retries=0)
    resp = c.chat.completions.create(
        model="relay", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert resp.choices[0].message.content is not None
    assert resp.usage is not None and resp.usage.total_tokens > 0
    stream = c.chat.completions.create(
        model="relay",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_openai_engine_relays_upstream_client_errors(front: str) -> None:
    body = {"model": "relay", "messages": [{"role": "user", "content": "hello " * 6000}], "max_tokens": 4096}
    r = httpx.post(f"{front}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


# ------------------------------------------------------------------------------- faults
@pytest.fixture(scope="module")
def faulty_gateway(faults: FaultInjector, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    # One engine per fault: a replica that keeps failing is ejected (circuit breaker), which would otherwise
    # turn every later case into a 503.
    faults_by_alias = {
        "ok": "ok",
        "slow": "slow-10",
        "broken": "status-500",
        "badjson": "badjson",
        "drop": "dropstream",
    }
    engines = "".join(
        f'  {alias}: {{kind: openai, urls: ["{faults.url}"], model: {model}}}\n'
        for alias, model in faults_by_alias.items()
    )
    aliases = "".join(
        f"  {alias}: {{engine: {alias}, prompter: {{mode: off}}}}\n" for alias in faults_by_alias
    )
    config = f"""
read_timeout_s: 1.5
request_timeout_s: 3
engines:
{engines}  dead: {{kind: openai, urls: ["{dead}"], model: ok}}
  prompter_dead: {{kind: openai, urls: ["{dead}"], model: ok}}
aliases:
{aliases}  down: {{engine: dead, prompter: {{mode: off}}}}
  open: {{engine: ok, prompter: {{mode: reference, engine: prompter_dead, fail_policy: open}}}}
  closed: {{engine: ok, prompter: {{mode: reference, engine: prompter_dead, fail_policy: closed}}}}
"""
    server, url = start_gateway(tmp_path_factory.mktemp("faulty"), config)
    yield url
    server.stop()


@pytest.mark.parametrize(
    ("alias", "status", "kind"),
    [
        ("slow", 504, "timeout_error"),
        ("broken", 502, "upstream_error"),
        ("badjson", 502, "upstream_error"),
        ("down", 503, "service_unavailable"),
        ("closed", 503, "service_unavailable"),
    ],
)
def test_upstream_faults_map_to_statuses(faulty_gateway: str, alias: str, status: int, kind: str) -> None:
    body = {"model": alias, "messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(f"{faulty_gateway}/v1/chat/completions", json=body, timeout=20)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind


def test_prompter_down_fails_open(faulty_gateway: str) -> None:
    body = {"model": "open", "messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(f"{faulty_gateway}/v1/chat/completions", json=body, timeout=20)
    assert r.status_code == 200
    assert r.headers["x-alignpro-degraded"] == "prompter-unavailable"
    info = r.json()["alignpro"]
    assert info["fallback"] == "prompter_unavailable" and info["rewritten"] is False


def test_dropped_stream_ends_with_an_error_event(faulty_gateway: str) -> None:
    body = {"model": "drop", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    with httpx.stream("POST", f"{faulty_gateway}/v1/chat/completions", json=body, timeout=20) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "stream_interrupted"


def test_gateway_serves_after_faults(faulty_gateway: str) -> None:
    body = {"model": "ok", "messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(f"{faulty_gateway}/v1/chat/completions", json=body, timeout=20)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"


def test_hidden_rewrites(tmp_path: Path, faults: FaultInjector) -> None:
    """reveal_rewrite=false keeps prompts out of responses and disables the rewrite endpoint."""
    config = f"""
reveal_rewrite: false
engines:
  faulty: {{kind: openai, urls: ["{faults.url}"], model: ok}}
aliases:
  ok: {{engine: faulty, prompter: {{mode: off}}}}
"""
    server, url = start_gateway(tmp_path, config)
    try:
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "ok", "messages": [{"role": "user", "content": "secret"}]},
        )
        assert r.status_code == 200
        assert "original_prompt" not in r.json()["alignpro"] and "secret" not in r.text
        r = httpx.post(f"{url}/v1/alignpro/rewrite", json={"model": "ok", "prompt": "secret"})
        assert r.status_code == 403
    finally:
        server.stop()


def test_prompt_too_long_for_the_prompter_fails_open(client: openai.OpenAI) -> None:
    """The prompter's context (instruction + examples + prompt) overflows before the frozen model's does."""
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-aligned",
        messages=[{"role": "user", "content": "hello " * 8000}],
        max_tokens=2,
    )
    resp = raw.parse()
    info = (resp.model_extra or {})["alignpro"]
    assert info["rewritten"] is False and info["fallback"] == "prompter_rejected_prompt"
    assert raw.headers["x-alignpro-fallback"] == "prompter_rejected_prompt"
