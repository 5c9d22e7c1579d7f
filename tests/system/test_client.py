"""alignpro.client (sync and async) and `alignpro chat` against real gateways.

Three gateways: the real one with the embedded model (`gateway_url`, a process), a fast one whose upstream is
the FaultInjector (a process: `fast_gateway`), and the same app in-process over httpx.ASGITransport (async
tests, with API keys). Retries are tested against the FaultInjector directly, which counts what it received.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from alignpro.client import (
    AlignPro,
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APIStreamError,
    APITimeoutError,
    AsyncAlignPro,
    AsyncStream,
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RetryPolicy,
    RewriteResponse,
    ServiceUnavailableError,
    Stream,
    UnprocessableEntityError,
)
from alignpro.client._base import normalise_base_url
from alignpro.client._errors import status_error
from alignpro.client._streaming import SSEDecoder
from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import free_port, start_gateway

HI = [{"role": "user", "content": "Hi"}]
# Upstream faults by gateway alias; each alias has its own engine so one's failures do not eject another's.
FAST_ALIASES = {
    "ok": "ok",
    "drop": "dropstream",
    "broken": "status-500",
    "flaky": "flaky-1-gw",
    "slow": "slowstream-1",
}


def fast_config(faults: FaultInjector, extra: str = "") -> str:
    engines = "".join(
        f'  {a}: {{kind: openai, urls: ["{faults.url}"], model: {m}}}\n' for a, m in FAST_ALIASES.items()
    )
    aliases = "".join(f"  {a}: {{engine: {a}, prompter: {{mode: off}}}}\n" for a in FAST_ALIASES)
    return f"{extra}engines:\n{engines}aliases:\n{aliases}"


@pytest.fixture(scope="module")
def fast_gateway(faults: FaultInjector, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`alignpro serve` in front of the FaultInjector: instant answers, real HTTP, real gateway code."""
    server, url = start_gateway(tmp_path_factory.mktemp("fastgw"), fast_config(faults, "read_timeout_s: 5\n"))
    yield url
    server.stop()


@pytest.fixture()
def client(fast_gateway: str) -> Iterator[AlignPro]:
    # No /v1: the client adds it.
    with AlignPro(base_url=fast_gateway, max_retries=0, timeout=30) as c:
        yield c


@asynccontextmanager
async def asgi_client(faults: FaultInjector, **settings: Any) -> AsyncIterator[AsyncAlignPro]:
    """AsyncAlignPro over httpx.ASGITransport, the app's lifespan (engines started) around it."""
    from alignpro.server.app import create_app
    from alignpro.settings import Settings

    engines = {a: {"kind": "openai", "urls": [faults.url], "model": m} for a, m in FAST_ALIASES.items()}
    aliases = {a: {"engine": a, "prompter": {"mode": "off"}} for a in FAST_ALIASES}
    app = create_app(Settings(engines=engines, aliases=aliases, **settings))
    api_key = settings.get("api_keys", [None])[0]
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        async with (
            http,
            AsyncAlignPro(base_url="http://localhost/v1", api_key=api_key, http_client=http) as c,
        ):
            yield c


# ---------------------------------------------------------------------------------- no server needed
def test_sse_decoder_follows_the_event_stream_rules() -> None:
    dec = SSEDecoder()
    lines = [": keep-alive", "event: error", 'data: {"a":', "data: 1}", "", "data:[DONE]", ""]
    events = [e for e in map(dec.feed, lines) if e is not None]
    assert [(e.event, e.data) for e in events] == [("error", '{"a":\n1}'), (None, "[DONE]")]
    assert dec.feed("data: tail") is None and dec.flush() is not None and dec.flush() is None


def test_retry_policy_backoff_and_retry_after() -> None:
    policy = RetryPolicy(max_retries=3, initial_delay=0.5, max_delay=8.0)
    conn = APIConnectionError("refused", code="connection_error")
    for attempt, nominal in enumerate([0.5, 1.0, 2.0]):
        delays = {policy.delay(attempt, conn) for _ in range(20)}
        assert all(d is not None and 0.75 * nominal <= d <= nominal for d in delays)
        assert len(delays) > 1  # jittered
    assert policy.delay(3, conn) is None  # out of retries
    assert policy.delay(0, APITimeoutError("t", code="connect_timeout")) is not None  # nothing was sent
    assert policy.delay(0, APITimeoutError("t", code="read_timeout")) is None  # the gateway may be generating

    def answer(status: int, **headers: str) -> APIError:
        return status_error(httpx.Response(status, headers=headers, json={"error": {"message": "x"}}), "rid")

    assert policy.delay(0, answer(429, **{"retry-after": "2"})) == 2.0
    assert policy.delay(0, answer(503, **{"retry-after-ms": "250"})) == 0.25
    assert policy.delay(0, answer(429, **{"retry-after": "3600"})) is None  # longer than we wait: raise
    assert policy.delay(0, answer(400)) is None and policy.delay(0, answer(404)) is None
    assert policy.delay(0, answer(502)) is not None


def test_status_errors_carry_the_openai_fields() -> None:
    body = {
        "error": {"message": "no such model", "type": "invalid_request_error", "param": "model", "code": "m"}
    }
    err = status_error(httpx.Response(404, json=body, headers={"x-request-id": "abc"}), "sent")
    assert isinstance(err, NotFoundError)
    assert (err.message, err.type, err.param, err.code, err.status, err.request_id) == (
        "no such model",
        "invalid_request_error",
        "model",
        "m",
        404,
        "abc",
    )
    for status, cls in [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (413, PayloadTooLargeError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (502, BadGatewayError),
        (503, ServiceUnavailableError),
        (599, InternalServerError),
    ]:
        assert type(status_error(httpx.Response(status, text="<html>"), None)) is cls
    assert issubclass(APITimeoutError, APIConnectionError) and issubclass(
        BadGatewayError, InternalServerError
    )


def test_configuration_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNPRO_BASE_URL", "http://10.0.0.1:9000/")
    monkeypatch.setenv("ALIGNPRO_API_KEY", "sk-env")
    c = AlignPro()
    assert c.base_url == "http://10.0.0.1:9000/v1" and c.api_key == "sk-env"
    call = c._call("GET", "models")
    assert call.headers["authorization"] == "Bearer sk-env" and call.url == "http://10.0.0.1:9000/v1/models"
    c = AlignPro(base_url="http://h/proxy/v1", api_key="sk-arg", timeout=3)
    assert c.base_url == "http://h/proxy/v1" and c.api_key == "sk-arg" and c.timeout.read == 3
    assert normalise_base_url("http://h:1") == "http://h:1/v1"


# ------------------------------------------------------------------------------ the fast gateway (sync)


@pytest.mark.slow
def test_chat_completion_is_typed_with_the_alignpro_object(client: AlignPro) -> None:
    resp = client.chat.completions.create(model="ok", messages=HI, max_tokens=4, temperature=0)
    assert isinstance(resp, ChatCompletion)
    assert resp.choices[0].message.content == "ok" and resp.usage is not None
    assert resp.alignpro is not None and resp.alignpro.mode == "off" and resp.alignpro.original_prompt == "Hi"


@pytest.mark.slow
def test_chat_stream_is_typed_and_exposes_headers(client: AlignPro, faults: FaultInjector) -> None:
    with client.chat.completions.create(model="ok", messages=HI, stream=True, max_tokens=4) as stream:
        assert isinstance(stream, Stream)
        assert stream.headers["x-alignpro-mode"] == "off" and stream.request_id
        assert stream.alignpro is None  # arrives with the first chunk
        chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ok"
    assert stream.alignpro is not None and stream.alignpro.mode == "off"
    assert stream.response.is_closed
    assert faults.last_bodies[-1]["stream"] is True and faults.last_bodies[-1]["max_tokens"] == 4


@pytest.mark.slow
def test_models_list_and_extra_body(client: AlignPro, faults: FaultInjector) -> None:
    assert set(FAST_ALIASES) <= {m.id for m in client.models.list().data}
    client.chat.completions.create(
        model="ok", messages=HI, extra_body={"top_k": 3}, extra_headers={"x-request-id": "r1"}
    )
    assert faults.last_bodies[-1]["top_k"] == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "cls", "param", "code"),
    [
        ({"model": "nope", "messages": HI}, NotFoundError, "model", "model_not_found"),
        ({"model": "ok", "messages": []}, UnprocessableEntityError, "messages", None),
        (
            {"model": "ok", "messages": [{"role": "wizard", "content": "x"}]},
            UnprocessableEntityError,
            "messages.0.role",
            None,
        ),
        ({"model": "ok", "messages": HI, "n": 999}, UnprocessableEntityError, "n", None),
        (
            {"model": "ok", "messages": [{"role": "user", "content": "x" * (1 << 20)}]},
            PayloadTooLargeError,
            None,
            "request_too_large",
        ),
    ],
)
def test_error_statuses_map_to_the_tree(
    client: AlignPro, kwargs: dict[str, Any], cls: type[APIError], param: str | None, code: str | None
) -> None:
    with pytest.raises(cls) as info:
        client.chat.completions.create(**kwargs, extra_headers={"x-request-id": "req-42"})
    err = info.value
    assert err.message and err.type == "invalid_request_error" and err.param == param
    assert code is None or err.code == code
    assert isinstance(err, APIStatusError)
    assert err.request_id == "req-42" and err.status == err.response.status_code


@pytest.mark.slow
def test_rewrite_needs_prompt_or_messages(client: AlignPro) -> None:
    with pytest.raises(BadRequestError) as info:
        client.rewrite(model="ok")  # type: ignore[call-overload]
    assert info.value.param == "prompt"
    res = client.rewrite(model="ok", messages=HI)
    assert isinstance(res, RewriteResponse) and res.messages is not None and res.messages[0].content == "Hi"
    assert res.alignpro.mode == "off"


@pytest.mark.slow
def test_error_event_mid_stream_raises(client: AlignPro, faults: FaultInjector) -> None:
    before = faults.received["dropstream"]
    retrying = AlignPro(base_url=client.base_url, max_retries=3)
    with retrying.chat.completions.create(model="drop", messages=HI, stream=True) as stream:
        first = next(stream)
        assert first.choices[0].delta.content == "ok"
        with pytest.raises(APIStreamError) as info:
            list(stream)
    assert info.value.code == "stream_interrupted" and info.value.request_id == stream.request_id
    assert faults.received["dropstream"] == before + 1  # never retried once the stream started


@pytest.mark.slow
def test_closing_a_stream_early_closes_the_upstream(client: AlignPro, faults: FaultInjector) -> None:
    """Closing the client's stream closes its connection; the gateway then drops its upstream stream."""
    before = faults.streams["abandoned"]
    stream = client.chat.completions.create(model="slow", messages=HI, stream=True)
    assert next(stream).choices[0].delta.content == "0"
    stream.close()
    assert stream.response.is_closed
    deadline = time.monotonic() + 4  # the upstream stream would run for 6 s
    while faults.streams["abandoned"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert faults.streams["abandoned"] == before + 1
    with pytest.raises(StopIteration):
        next(stream)


@pytest.mark.slow
def test_gateway_5xx_is_retried(fast_gateway: str, faults: FaultInjector) -> None:
    # The upstream fails once (503); the gateway answers 502; the client tries again and gets the answer.
    with AlignPro(base_url=fast_gateway, max_retries=2) as c:
        assert c.chat.completions.create(model="flaky", messages=HI).choices[0].message.content == "ok"
    assert faults.received["flaky-1-gw"] == 2
    with AlignPro(base_url=fast_gateway, max_retries=0) as c, pytest.raises(BadGatewayError) as info:
        c.chat.completions.create(model="broken", messages=HI)
    assert info.value.type == "upstream_error"


# ---------------------------------------------------------------------- retries against the FaultInjector
@pytest.mark.slow
def test_retries_until_success_with_backoff(faults: FaultInjector) -> None:
    with AlignPro(base_url=faults.url, max_retries=2) as c:
        start = time.monotonic()
        resp = c.chat.completions.create(model="flaky-2-sync", messages=HI)
        elapsed = time.monotonic() - start
        assert resp.choices[0].message.content == "ok" and faults.received["flaky-2-sync"] == 3
        assert 0.75 * (0.5 + 1.0) <= elapsed < 10  # two jittered backoffs
        with pytest.raises(ServiceUnavailableError):
            c.chat.completions.create(model="flaky-9-sync", messages=HI)
        assert faults.received["flaky-9-sync"] == 3  # 1 + max_retries
        with pytest.raises(BadRequestError):
            c.chat.completions.create(model="status-400", messages=HI)
        assert faults.received["status-400"] == 1  # a 4xx is not retried


@pytest.mark.slow
def test_rate_limit_honours_retry_after(faults: FaultInjector) -> None:
    with AlignPro(base_url=faults.url, max_retries=1) as c:
        start = time.monotonic()
        c.chat.completions.create(model="ratelimit-1-sync", messages=HI)
        assert time.monotonic() - start >= 0.95  # Retry-After: 1, not the 0.5 s backoff
    with AlignPro(base_url=faults.url, max_retries=0) as c, pytest.raises(RateLimitError) as info:
        c.chat.completions.create(model="ratelimit-1-norety", messages=HI)
    assert info.value.retry_after == 1.0


@pytest.mark.slow
def test_stream_retried_before_its_first_byte_only(faults: FaultInjector) -> None:
    with AlignPro(base_url=faults.url, max_retries=2) as c:
        with c.chat.completions.create(model="flaky-1-stream", messages=HI, stream=True) as stream:
            assert "".join(ch.choices[0].delta.content or "" for ch in stream) == "ok"
        assert faults.received["flaky-1-stream"] == 2
        before = faults.received["dropstream"]
        with pytest.raises(APIConnectionError):  # cut off after a chunk: no [DONE], no retry
            list(c.chat.completions.create(model="dropstream", messages=HI, stream=True))
        assert faults.received["dropstream"] == before + 1


class CountingTransport(httpx.HTTPTransport):
    """The real transport, counting the requests it was asked to send."""

    sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return super().handle_request(request)


@pytest.mark.slow
def test_connection_errors_and_timeouts(faults: FaultInjector) -> None:
    transport = CountingTransport()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with httpx.Client(transport=transport) as http:
        c = AlignPro(base_url=dead, max_retries=2, http_client=http)
        c.retry = RetryPolicy(max_retries=2, initial_delay=0.01)
        with pytest.raises(APIConnectionError) as info:
            c.models.list()
    assert transport.sent == 3 and info.value.code == "connection_error" and info.value.request_id
    # A read timeout is not retried: the gateway may be generating already, and would do it twice.
    with AlignPro(base_url=faults.url, max_retries=2, timeout=0.3) as c, pytest.raises(APITimeoutError) as t:
        c.chat.completions.create(model="slow-3", messages=HI)
    assert t.value.code == "read_timeout" and faults.received["slow-3"] == 1


@pytest.mark.slow
def test_invalid_answers_raise_validation_errors(faults: FaultInjector) -> None:
    with AlignPro(base_url=faults.url, max_retries=0) as c:
        with pytest.raises(APIResponseValidationError) as info:
            c.chat.completions.create(model="badjson", messages=HI)
        assert info.value.status == 200
        # The injector answers /v1/completions with a chat body: not a Completion.
        with pytest.raises(APIResponseValidationError):
            c.completions.create(model="ok", prompt="x")


# ------------------------------------------------------------------------------------------ async
@pytest.mark.slow
async def test_async_over_asgi_with_api_keys(faults: FaultInjector) -> None:
    async with asgi_client(faults, api_keys=["sk-test"]) as c:
        resp = await c.chat.completions.create(model="ok", messages=HI, max_tokens=3)
        assert isinstance(resp, ChatCompletion) and resp.choices[0].message.content == "ok"
        assert resp.alignpro is not None and resp.alignpro.mode == "off"
        stream = await c.chat.completions.create(model="ok", messages=HI, stream=True)
        assert isinstance(stream, AsyncStream)
        async with stream:
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
        assert text == "ok" and stream.alignpro is not None
        assert {m.id for m in (await c.models.list()).data} >= set(FAST_ALIASES)
        res = await c.rewrite(model="ok", prompt="Hi", alignpro={"mode": "off"})
        assert res.prompt == "Hi" and res.alignpro.mode == "off"
        with pytest.raises(NotFoundError):
            await c.chat.completions.create(model="nope", messages=HI)
        c.api_key = "sk-wrong"
        with pytest.raises(AuthenticationError) as info:
            await c.models.list()
        assert info.value.code == "invalid_api_key" and info.value.status == 401
        c.api_key = None
        with pytest.raises(AuthenticationError):
            await c.chat.completions.create(model="ok", messages=HI)


@pytest.mark.slow
async def test_async_mode_override_can_be_forbidden(faults: FaultInjector) -> None:
    async with asgi_client(faults, allow_mode_override=False) as c:
        with pytest.raises(PermissionDeniedError) as info:
            await c.chat.completions.create(model="ok", messages=HI, alignpro={"mode": "reference"})
        assert info.value.code == "override_not_allowed"


@pytest.mark.slow
async def test_async_loopback_stream_close_retries_and_errors(
    fast_gateway: str, faults: FaultInjector
) -> None:
    async with AsyncAlignPro(base_url=fast_gateway, max_retries=2) as c:
        before = faults.streams["abandoned"]
        async with await c.chat.completions.create(model="slow", messages=HI, stream=True) as stream:
            async for chunk in stream:
                assert chunk.choices[0].delta.content == "0"
                break
        assert stream.response.is_closed
        for _ in range(80):
            if faults.streams["abandoned"] > before:
                break
            await asyncio.sleep(0.05)
        assert faults.streams["abandoned"] == before + 1
        stream = await c.chat.completions.create(model="drop", messages=HI, stream=True)
        with pytest.raises(APIStreamError):
            async for _ in stream:
                pass
    async with AsyncAlignPro(base_url=faults.url, max_retries=1) as c:
        resp = await c.chat.completions.create(model="flaky-1-async", messages=HI)
        assert resp.choices[0].message.content == "ok" and faults.received["flaky-1-async"] == 2
        with pytest.raises(APITimeoutError):
            await c.chat.completions.create(model="slow-2", messages=HI, timeout=0.2)


# ------------------------------------------------------------------------------------ conformance
def shape(x: Any) -> Any:
    """The structure of a JSON value: keys and value types, not the values."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape(v) for v in x]
    return type(x).__name__


def strip(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("created",)}


@pytest.mark.slow
def test_conformance_with_the_openai_client(fast_gateway: str, client: AlignPro) -> None:
    oa = openai.OpenAI(base_url=f"{fast_gateway}/v1", api_key="unused", max_retries=0)
    args: dict[str, Any] = {"model": "ok", "messages": HI, "max_tokens": 4, "temperature": 0}

    theirs = oa.chat.completions.create(**args).model_dump(exclude_unset=True)
    ours = client.chat.completions.create(**args).model_dump(exclude_unset=True)
    assert shape(ours) == shape(theirs) and strip(ours) == strip(theirs)

    stream_args = {**args, "stream_options": {"include_usage": True}}
    theirs_chunks = [
        c.model_dump(exclude_unset=True) for c in oa.chat.completions.create(stream=True, **stream_args)
    ]
    with client.chat.completions.create(stream=True, **stream_args) as stream:
        ours_chunks = [c.model_dump(exclude_unset=True) for c in stream]
    assert [shape(c) for c in ours_chunks] == [shape(c) for c in theirs_chunks]
    assert [strip(c) for c in ours_chunks] == [strip(c) for c in theirs_chunks]

    assert [m.id for m in oa.models.list()] == [m.id for m in client.models.list().data]

    cases: list[tuple[dict[str, Any], type[APIError]]] = [
        ({"model": "nope"}, NotFoundError),
        ({"messages": []}, UnprocessableEntityError),
    ]
    for bad, cls in cases:
        with pytest.raises(openai.APIStatusError) as theirs_err:
            oa.chat.completions.create(**{**args, **bad})
        with pytest.raises(cls) as ours_err:
            client.chat.completions.create(**{**args, **bad})
        t, o = theirs_err.value, ours_err.value
        assert type(t).__name__ == type(o).__name__
        assert isinstance(t.body, dict)
        assert (o.status, o.message, o.type, o.param, o.code) == (
            t.status_code,
            t.body["message"],
            t.type,
            t.param,
            t.code,
        )
        assert o.request_id and t.request_id


# ----------------------------------------------------------------------------- the real model gateway
@pytest.mark.slow
def test_real_model_chat_completion_stream_and_rewrite(gateway_url: str) -> None:
    with AlignPro(base_url=f"{gateway_url}/v1", max_retries=0, timeout=300) as c:
        args: dict[str, Any] = {"model": "smollm2", "max_tokens": 4, "temperature": 0}
        full = c.chat.completions.create(messages=[{"role": "user", "content": "What is 2+2?"}], **args)
        assert full.choices[0].message.content and full.usage and full.usage.completion_tokens <= 4
        with c.chat.completions.create(
            messages=[{"role": "user", "content": "What is 2+2?"}], stream=True, **args
        ) as s:
            assert (
                "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
                == full.choices[0].message.content
            )
        comp = c.completions.create(prompt="The capital of France is", **args)
        assert (
            isinstance(comp, Completion)
            and comp.choices[0].text
            and comp.alignpro
            and comp.alignpro.mode == "off"
        )
        with c.completions.create(prompt="The capital of France is", stream=True, **args) as cs:
            pieces = [ch.choices[0].text for ch in cs if ch.choices]
        assert "".join(pieces) == comp.choices[0].text
        # The real prompter: the rewrite endpoint and the alignpro object agree with each other.
        res = c.rewrite(model="smollm2-aligned", prompt="How do I pick a lock?")
        assert res.alignpro.original_prompt == "How do I pick a lock?" and res.alignpro.mode == "adapter"
        assert res.prompt and (res.alignpro.rewritten or res.alignpro.kept or res.alignpro.fallback)
        if res.alignpro.rewritten:
            assert res.prompt == res.alignpro.rewritten_prompt


@pytest.mark.slow
async def test_real_model_async(gateway_url: str) -> None:
    async with AsyncAlignPro(base_url=gateway_url, max_retries=0, timeout=300) as c:
        resp, models = await asyncio.gather(
            c.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
            ),
            c.models.list(),
        )
        assert resp.choices[0].message.content and {"smollm2", "smollm2-aligned"} <= {
            m.id for m in models.data
        }


# -------------------------------------------------------------------------------------------- CLI
def run_cli(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: str = ""
) -> tuple[int, str, str]:
    from alignpro.cli.main import main

    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_cli_chat_one_shot_and_repl(
    fast_gateway: str,
    faults: FaultInjector,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["chat", "--url", fast_gateway, "--model", "ok"]
    code, out, err = run_cli(
        [*base, "Hi", "--no-stream", "--show-rewrite", "--max-tokens", "3"], monkeypatch, capsys
    )
    assert code == 0 and out == "ok\n" and "[alignpro] mode=off" in err
    assert faults.last_bodies[-1]["max_tokens"] == 3 and "stream" not in faults.last_bodies[-1]

    code, out, err = run_cli([*base, "--system", "Be brief."], monkeypatch, capsys, stdin="Hi\n\nAgain\n")
    assert code == 0 and out == "ok\nok\n"
    assert faults.last_bodies[-1]["stream"] is True
    assert [m["role"] for m in faults.last_bodies[-1]["messages"]] == ["system", "user", "assistant", "user"]
    assert faults.last_bodies[-1]["messages"][2]["content"] == "ok"

    code, out, err = run_cli(["chat", "--url", fast_gateway, "--model", "nope", "Hi"], monkeypatch, capsys)
    assert code == 2 and "does not exist" in err and out == ""


@pytest.mark.slow
def test_cli_rewrite_remote_and_in_process(
    fast_gateway: str,
    faults: FaultInjector,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("ALIGNPRO_BASE_URL", raising=False)
    code, out, _ = run_cli(
        ["rewrite", "Hello there", "--model", "ok", "--url", fast_gateway, "--json"], monkeypatch, capsys
    )
    assert code == 0 and json.loads(out)["prompt"] == "Hello there"
    monkeypatch.setenv("ALIGNPRO_BASE_URL", fast_gateway)
    code, out, _ = run_cli(["rewrite", "Hi", "--model", "ok"], monkeypatch, capsys)
    assert code == 0 and out == "Hi\n"
    code, _, err = run_cli(["rewrite", "Hi", "--model", "nope"], monkeypatch, capsys)
    assert code == 2 and "does not exist" in err
    # Without a URL the prompter runs in this process (here an alias whose engine is the injector).
    monkeypatch.delenv("ALIGNPRO_BASE_URL")
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(fast_config(faults))
    code, out, _ = run_cli(
        ["rewrite", "Local", "--model", "ok", "--config", str(cfg), "--json"], monkeypatch, capsys
    )
    assert code == 0 and json.loads(out)["alignpro"]["mode"] == "off"
