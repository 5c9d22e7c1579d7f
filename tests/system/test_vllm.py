"""The gateway in front of a real vLLM (CPU build), as in production.

One vLLM process serves the embedded SmolLM2 for the whole module, with a random LoRA adapter loaded as the
``alignpro-prompter`` module, and one real ``alignpro serve`` process points its ``openai`` engine at it:

    smollm2           prompter off: a pass-through, compared token for token with vLLM answering directly
    smollm2-aligned   the reference prompter, run by the same vLLM on the base model
    smollm2-adapter   the prompter as a LoRA adapter on the same vLLM, called by name (mode adapter)

vLLM comes from .venv-vllm (or ``$ALIGNPRO_VLLM_PYTHON``) and must answer /health within 180 s
(``$ALIGNPRO_VLLM_START_TIMEOUT`` on a slower machine); otherwise every test here errors with vLLM's log tail.

Greedy decoding (temperature 0) makes "the same as vLLM directly" an exact comparison. Requests are short
(a few tokens) because the CI machine is two shared CPU cores; speed is measured in bench/vllm_latency.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from alignpro.prompter.instruction import parse_output, prompter_messages
from alignpro.testing.servers import Server, gateway_server
from alignpro.testing.vllm import SERVED_MODEL, make_lora_adapter, prometheus_value, start_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ADAPTER = "alignpro-prompter"
TIMEOUT = httpx.Timeout(300.0, connect=10.0)  # generous: the CPU is shared with other jobs
REFERENCE_MAX_TOKENS = 64
ADAPTER_MAX_TOKENS = 8
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    from alignpro import embedded

    return embedded.prepare()  # idempotent: converts the GGUF once per ALIGNPRO_HOME


@pytest.fixture(scope="module")
def adapter_dir(smollm2_dir: Path, workdir: Path) -> Path:
    return make_lora_adapter(smollm2_dir, workdir / "adapter", rank=8)


@pytest.fixture(scope="module")
def vllm(smollm2_dir: Path, adapter_dir: Path, workdir: Path) -> Iterator[Server]:
    # Without prefix caching a repeated prompt is computed the same way each time, so greedy answers compare
    # exactly (a cached prefix changes the bf16 arithmetic, and near-ties can then flip).
    server = start_vllm(
        smollm2_dir,
        workdir,
        lora={ADAPTER: adapter_dir},
        extra_args=["--no-enable-prefix-caching"],
        # ~30 s on an idle 2-core runner, ~80 s at load 3, over 180 s on a machine shared by many jobs.
        timeout=float(os.environ.get("ALIGNPRO_VLLM_START_TIMEOUT", "180")),
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(vllm: Server, workdir: Path) -> Iterator[Server]:
    config = f"""
read_timeout_s: 300
rewrite_cache_size: 0   # every aligned request really runs the prompter
engines:
  # ignore_eos is a vLLM extension the operator must allow (the disconnect test needs a long answer)
  vllm: {{kind: openai, urls: ["{vllm.url}/v1"], model: {SERVED_MODEL}, allowed_fields: [ignore_eos]}}
aliases:
  smollm2: {{engine: vllm, prompter: {{mode: "off"}}}}
  smollm2-aligned:
    engine: vllm
    prompter: {{mode: reference, engine: vllm, temperature: 0, max_tokens: {REFERENCE_MAX_TOKENS}}}
  smollm2-adapter:
    engine: vllm
    prompter: {{mode: adapter, engine: vllm, model: {ADAPTER}, temperature: 0,
               max_tokens: {ADAPTER_MAX_TOKENS}, fail_policy: closed}}
"""
    server = gateway_server(workdir, config).start(timeout=60.0)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", timeout=300.0, max_retries=0)


@pytest.fixture(scope="module")
def direct(vllm: Server) -> openai.OpenAI:
    """The same vLLM without the gateway, as the reference answers."""
    return openai.OpenAI(base_url=f"{vllm.url}/v1", api_key="unused", timeout=300.0, max_retries=0)


def vllm_metrics(vllm: Server) -> str:
    return httpx.get(f"{vllm.url}/metrics", timeout=TIMEOUT).text


def finished_requests(vllm: Server) -> float:
    return prometheus_value(vllm_metrics(vllm), "vllm:request_success_total")


def settles_at(read: Any, want: float, timeout: float = 10.0) -> float:
    """Poll ``read()`` until it returns ``want`` or ``timeout`` passes; the last value read.

    vLLM updates its counters just after it answers, so a value read right after a response can lag.
    """
    deadline = time.monotonic() + timeout
    value = read()
    while value != want and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return float(value)


def sse_lines(resp: httpx.Response) -> list[str]:
    return [line for line in resp.iter_lines() if line.startswith("data: ")]


# ---------------------------------------------------------------------------------------------- pass-through
def test_chat_and_completion_match_vllm(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    via = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0)
    ref = direct.chat.completions.create(model=SERVED_MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert via.choices[0].message.content == ref.choices[0].message.content
    assert via.choices[0].message.content
    assert via.usage is not None and ref.usage is not None
    assert via.usage.completion_tokens == ref.usage.completion_tokens <= 12
    assert (via.model_extra or {})["alignpro"]["mode"] == "off"

    prompt = "The capital of France is"
    c_via = client.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0)
    c_ref = direct.completions.create(model=SERVED_MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert c_via.choices[0].text == c_ref.choices[0].text != ""
    assert c_via.usage is not None and c_ref.usage is not None
    assert c_via.usage.prompt_tokens == c_ref.usage.prompt_tokens


def test_stream_forwards_usage_and_ends_with_done(gateway: Server, client: openai.OpenAI) -> None:
    body = {
        "model": "smollm2",
        "messages": CHAT,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with (
        httpx.Client(timeout=TIMEOUT) as http,
        http.stream("POST", f"{gateway.url}/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(r)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["alignpro"]["mode"] == "off"
    usage = chunks[-1]["usage"]  # include_usage: a last chunk with no choices and the totals
    assert chunks[-1]["choices"] == []
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text

    # The same through the official client, for text completions.
    stream = client.completions.create(
        model="smollm2",
        prompt="Once upon a time",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = list(stream)
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 5
    assert "".join(p.choices[0].text for p in parts if p.choices)


def test_n_stop_and_logprobs(client: openai.OpenAI) -> None:
    many = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, temperature=1.0, n=3)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]

    # stop: cut the greedy answer at its third word; the answer must end just before it, finish_reason stop.
    base = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=16, temperature=0)
    full = base.choices[0].message.content or ""
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = client.chat.completions.create(
        model="smollm2",
        messages=CHAT,
        max_tokens=16,
        temperature=0,
        stop=[stop],
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]

    lp = client.chat.completions.create(
        model="smollm2",
        messages=CHAT,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = lp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and lp.usage is not None
    assert len(content) == lp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)

    clp = client.completions.create(
        model="smollm2", prompt="One, two,", max_tokens=3, temperature=0, logprobs=2
    )
    assert clp.choices[0].logprobs is not None
    assert len(clp.choices[0].logprobs.tokens or []) == 3
    assert all(len(d) == 2 for d in clp.choices[0].logprobs.top_logprobs or [])


def test_vllm_extras_pass_through(client: openai.OpenAI) -> None:
    # top_k=1 keeps only the likeliest token, so even at a high temperature the n samples are identical;
    # without it they are not. (Comparing with a temperature-0 answer is not exact on CPU: bf16 near-ties
    # break either way depending on how the batch was computed.)
    kw: dict[str, Any] = {"model": "smollm2", "messages": CHAT, "max_tokens": 8, "temperature": 1.5, "n": 3}
    topk = client.chat.completions.create(**kw, extra_body={"top_k": 1})
    assert len({c.message.content for c in topk.choices}) == 1
    free = client.chat.completions.create(**kw)
    assert len({c.message.content for c in free.choices}) > 1
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="smollm2",
            messages=CHAT,
            max_tokens=4,
            extra_body={"top_k": -5},
        )
    assert "top_k" in bad.value.message  # vLLM's own validation, relayed as a 400

    # vLLM 0.32 takes `structured_outputs`; the older `guided_choice`/`guided_json` are silently ignored.
    choice = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Pick a colour."}],
        max_tokens=5,
        temperature=1.0,
        extra_body={"structured_outputs": {"choice": ["crimson", "teal"]}},
    )
    assert choice.choices[0].message.content in ("crimson", "teal")
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    js = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Pick a colour as JSON."}],
        max_tokens=40,
        temperature=0,
        extra_body={"structured_outputs": {"json": schema}},
    )
    assert json.loads(js.choices[0].message.content or "")["colour"] in ("red", "blue")


# ---------------------------------------------------------------------------------------------- errors
def _count_400(vllm: Server) -> int:
    return len(re.findall(r'"POST /v1/(?:chat/)?completions HTTP/1\.1" 400', vllm.log_text()))


@pytest.mark.parametrize(
    ("alias", "stream", "upstream_calls"),
    [("smollm2", False, 1), ("smollm2", True, 1), ("smollm2-aligned", False, 2)],
)
def test_prompt_over_context_is_a_relayed_400(
    gateway: Server, vllm: Server, alias: str, stream: bool, upstream_calls: int
) -> None:
    # ~3000 tokens against --max-model-len 2048. Through the aligned alias the prompter's own call is too long
    # as well; under fail_policy open it falls back, and the frozen model's 400 is what the caller gets.
    body: dict[str, Any] = {
        "model": alias,
        "messages": [{"role": "user", "content": "hello " * 3000}],
        "max_tokens": 4,
        "stream": stream,
    }
    before = _count_400(vllm)
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")  # an error, not an event stream
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert err["type"] == "invalid_request_error"
    assert err["param"] == "messages"
    assert "maximum context length is 2048" in err["message"]
    # Relayed, not retried: vLLM saw exactly one request per stage.
    assert settles_at(lambda: _count_400(vllm) - before, upstream_calls, timeout=5) == upstream_calls


def test_completion_over_context_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="smollm2", prompt="hello " * 3000, max_tokens=4)
    assert exc.value.code == "context_length_exceeded"
    assert exc.value.param == "prompt"


# ---------------------------------------------------------------------------------------------- cancellation
def test_client_disconnect_cancels_the_vllm_request(gateway: Server, vllm: Server) -> None:
    max_tokens = 1800  # with ignore_eos vLLM would generate all of them (a minute or more on this CPU)
    text = vllm_metrics(vllm)
    assert prometheus_value(text, "vllm:num_requests_running") == 0
    generated_before = prometheus_value(text, "vllm:generation_tokens_total")
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream("POST", f"{gateway.url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            seen, running_seen = 0, 0.0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                # vLLM updates its gauges between scheduler steps: read on until it shows the request running
                # (a loaded machine once answered 0 after 4 chunks), at most a few hundred of the 1800 tokens.
                if seen >= 4:
                    running_seen = prometheus_value(vllm_metrics(vllm), "vllm:num_requests_running")
                if running_seen == 1 or seen >= 300:
                    break
            assert running_seen == 1
        closed = time.monotonic()  # leaving the block closed the connection to the gateway mid-stream
    running = 1.0
    while time.monotonic() - closed < 30:
        running = prometheus_value(vllm_metrics(vllm), "vllm:num_requests_running")
        if running == 0:
            break
        time.sleep(0.2)
    stopped_after = time.monotonic() - closed
    assert running == 0, "vLLM kept generating after the client went away"
    generated = prometheus_value(vllm_metrics(vllm), "vllm:generation_tokens_total") - generated_before
    # Aborted, not finished: far fewer tokens than asked for.
    assert 1 <= generated < max_tokens / 2, (generated, stopped_after)


# ---------------------------------------------------------------------------------------------- prompters
def test_reference_prompter_runs_on_the_same_vllm(
    client: openai.OpenAI, direct: openai.OpenAI, vllm: Server
) -> None:
    text = "write a poem about dogs in 4 lines"
    before = finished_requests(vllm)
    r = client.chat.completions.create(
        model="smollm2-aligned",
        messages=[{"role": "user", "content": text}],
        max_tokens=6,
        temperature=0,
    )
    info = (r.model_extra or {})["alignpro"]
    assert info["mode"] == "reference" and info["prompter"] == "vllm/base"
    # The prompter's call and the frozen model's, both on this vLLM.
    assert settles_at(lambda: finished_requests(vllm) - before, 2) == 2
    # The rewrite is exactly what vLLM's base model answers to the prompter chat (greedy on both sides).
    ref = direct.chat.completions.create(
        model=SERVED_MODEL,
        messages=prompter_messages(text, "rewrite"),  # type: ignore[arg-type]
        max_tokens=REFERENCE_MAX_TOKENS,
        temperature=0,
    )
    parsed = parse_output(ref.choices[0].message.content or "", ref.choices[0].finish_reason, text)
    if parsed.text is None:
        assert info["fallback"] == parsed.reason
    elif parsed.text == text:  # KEEP: the user's words are sent, and reported as kept
        assert info["kept"] is True and info["rewritten"] is False
    else:
        assert info["rewritten"] is True and info["rewritten_prompt"] == parsed.text


def test_lora_prompter_served_by_vllm(client: openai.OpenAI, direct: openai.OpenAI, vllm: Server) -> None:
    served = {m.id for m in direct.models.list().data}
    assert {SERVED_MODEL, ADAPTER} <= served
    text = "how do I bake bread?"
    chat = prompter_messages(text, "rewrite")
    kw: dict[str, Any] = {
        "messages": chat,
        "max_tokens": ADAPTER_MAX_TOKENS,
        "temperature": 0,
        "logprobs": True,
    }
    on_adapter = direct.chat.completions.create(model=ADAPTER, **kw)
    on_base = direct.chat.completions.create(model=SERVED_MODEL, **kw)
    # The random adapter really changes the model: same prompt, greedy, different log-probabilities. (The tokens
    # may agree: both answer this clear request with KEEP.)
    assert on_adapter.choices[0].logprobs is not None and on_base.choices[0].logprobs is not None
    assert on_adapter.choices[0].logprobs.content and on_base.choices[0].logprobs.content
    first_adapter = on_adapter.choices[0].logprobs.content[0]
    first_base = on_base.choices[0].logprobs.content[0]
    assert (first_adapter.token, round(first_adapter.logprob, 3)) != (
        first_base.token,
        round(first_base.logprob, 3),
    )

    r = client.chat.completions.create(
        model="smollm2-adapter",
        messages=[{"role": "user", "content": text}],
        max_tokens=4,
        temperature=0,
    )
    info = (r.model_extra or {})["alignpro"]
    # fail_policy closed: had the adapter call failed, this would be a 503, not an answer.
    assert info["mode"] == "adapter" and info["prompter"] == f"vllm/{ADAPTER}"
    expected = parse_output(
        on_adapter.choices[0].message.content or "", on_adapter.choices[0].finish_reason, text
    )
    if expected.text is None:
        assert info["fallback"] == expected.reason  # e.g. truncated: 8 tokens rarely finish a rewrite
    else:
        assert info["rewritten_prompt"] == expected.text


# ---------------------------------------------------------------------------------------------- /v1/responses
def test_responses_api_through_the_gateway(client: openai.OpenAI) -> None:
    """The prompter rewrites the user input, vLLM answers, and a follow-up continues vLLM's stored response."""
    question = "Name three colours of the rainbow."
    first = client.responses.create(
        model="smollm2-aligned", input=question, max_output_tokens=16, temperature=0
    )
    info = first.model_extra["alignpro"]  # type: ignore[index]
    assert info["mode"] == "reference" and info["original_prompt"] == question and "fallback" not in info
    assert first.output_text.strip() and first.id.startswith("resp")
    follow = client.responses.create(
        model="smollm2",
        input="Name two more.",
        previous_response_id=first.id,
        max_output_tokens=8,
        temperature=0,
    )
    assert follow.previous_response_id == first.id and follow.output_text.strip()
    # vLLM prepended the stored turn: the follow-up's prompt is longer than its own words.
    assert follow.usage is not None and first.usage is not None
    assert follow.usage.input_tokens > first.usage.input_tokens


def test_responses_stream_through_the_gateway(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model="smollm2-aligned", input="Say hello.", max_output_tokens=12, temperature=0, stream=True
        )
    )
    assert events[0].type == "response.created"
    assert events[0].model_extra["alignpro"]["original_prompt"] == "Say hello."  # type: ignore[index]
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == last.response.output_text


# ---------------------------------------------------------------------------------------------- adapter swap
async def test_prompter_adapter_swapped_without_a_restart(
    vllm: Server, direct: openai.OpenAI, smollm2_dir: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The admin call loads a new adapter version into the running vLLM (/v1/load_lora_adapter) and moves the
    alias to it: the next request is rewritten by the new adapter, and the cache serves nothing of the old one."""
    from alignpro.server.app import create_app
    from alignpro.settings import Settings

    caplog.set_level(logging.INFO, logger="alignpro.audit")
    settings = Settings(
        engines={"vllm": {"kind": "openai", "urls": [f"{vllm.url}/v1"], "model": SERVED_MODEL}},
        aliases={
            "swappable": {
                "engine": "vllm",
                "prompter": {
                    "mode": "adapter",
                    "engine": "vllm",
                    "model": ADAPTER,
                    "temperature": 0,
                    "max_tokens": ADAPTER_MAX_TOKENS,
                    "fail_policy": "closed",
                },
            },
            "plain": {"engine": "vllm", "prompter": {"mode": "off"}},
        },
        api_keys=[{"key": "sk-admin", "admin": True}, "sk-user"],
        read_timeout_s=300,
    )
    v2 = make_lora_adapter(smollm2_dir, workdir / "adapter-v2", rank=8, seed=1)
    text = "how do I bake bread?"
    chat = {
        "model": "swappable",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 2,
        "temperature": 0,
    }
    admin, user = {"authorization": "Bearer sk-admin"}, {"authorization": "Bearer sk-user"}
    app = create_app(settings)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=TIMEOUT)
    async with app.router.lifespan_context(app), http:
        before = await http.post("/v1/chat/completions", json=chat, headers=user)
        assert before.status_code == 200 and before.json()["alignpro"]["prompter"] == f"vllm/{ADAPTER}", (
            before.text
        )
        swap = {"model": f"{ADAPTER}-v2", "path": str(v2)}
        r = await http.post("/admin/aliases/swappable/prompter", json=swap, headers=user)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
        r = await http.post("/admin/aliases/plain/prompter", json=swap, headers=admin)
        assert r.status_code == 400 and r.json()["error"]["param"] == "alias"
        r = await http.post(
            "/admin/aliases/swappable/prompter",
            json={"model": "x", "path": "/no/such/adapter"},
            headers=admin,
        )
        assert 400 <= r.status_code < 500 and r.json()["error"]["message"], r.text
        r = await http.post("/admin/aliases/swappable/prompter", json=swap, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "alias": "swappable",
            "previous": ADAPTER,
            "model": f"{ADAPTER}-v2",
            "fingerprint": f"{ADAPTER}-v2@{v2}",
            "loaded_on": [f"{vllm.url}/v1"],
        }
        after = await http.post("/v1/chat/completions", json=chat, headers=user)
    assert after.status_code == 200, after.text
    info = after.json()["alignpro"]
    assert info["prompter"] == f"vllm/{ADAPTER}-v2" and after.headers.get("x-alignpro-cache") is None
    assert f"{ADAPTER}-v2" in {m.id for m in direct.models.list().data}
    # The rewrite is v2's: what that adapter answers directly under the prompter instruction (greedy).
    kw: dict[str, Any] = {"messages": prompter_messages(text, "rewrite"), "max_tokens": ADAPTER_MAX_TOKENS}
    on_v2 = direct.chat.completions.create(model=f"{ADAPTER}-v2", temperature=0, **kw)
    expected = parse_output(on_v2.choices[0].message.content or "", on_v2.choices[0].finish_reason, text)
    if expected.text is None:
        assert info["fallback"] == expected.reason
    else:
        assert info["rewritten_prompt"] == expected.text
    swaps = [json.loads(r.getMessage()) for r in caplog.records if '"prompter_swap"' in r.getMessage()]
    assert [(s["alias"], s["previous"], s["model"]) for s in swaps] == [
        ("swappable", ADAPTER, f"{ADAPTER}-v2")
    ]
