"""Bad input, generated: nothing a client sends may produce a 5xx, and SSE relaying survives any chunking.

* schemathesis generates requests from the gateway's own OpenAPI schema (the request bodies come from the
  pydantic models via ``openapi_extra``), valid and invalid, for every operation; none may answer 5xx.
* hypothesis sends arbitrary JSON, and near-valid requests with one field replaced by arbitrary JSON, to every
  POST route: no 5xx, and every error in the OpenAI shape.
* hypothesis splits a stream of SSE events at arbitrary byte boundaries on its way into the ``openai`` engine:
  the events come out intact, in order, each exactly once.

The gateway is a real process in front of the FaultInjector. ``ALIGNPRO_FUZZ_EXAMPLES`` sets the examples per
operation and mode (CI default 10; ``ALIGNPRO_FUZZ_EXAMPLES=100`` gives the long run, well over 1000 cases).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from alignpro.engines.factory import Timeouts, build_engine
from alignpro.engines.openai import OpenAIEngine
from alignpro.engines.transport import UpstreamClient, UpstreamResponse
from alignpro.settings import EngineConfig, Settings
from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import free_port, start_gateway

KEY = "sk-fuzz-5e1d"
AUTH = {"authorization": f"Bearer {KEY}"}
JSON_AUTH = {**AUTH, "content-type": "application/json"}  # bodies must be declared JSON
EXAMPLES = int(os.environ.get("ALIGNPRO_FUZZ_EXAMPLES", "10"))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    fi = FaultInjector(free_port()).start()
    # `ok`: straight to the upstream; `aligned`: through a prompter that fails (fail-open), so the prompter
    # path runs on every request without loading a model.
    config = f"""
max_body_bytes: 65536
engines:
  fi: {{kind: openai, urls: ["{fi.url}"], model: ok}}
  broken_prompter: {{kind: openai, urls: ["{fi.url}"], model: status-500, failure_threshold: 1000000}}
aliases:
  ok: {{engine: fi, prompter: {{mode: off}}}}
  aligned: {{engine: fi, prompter: {{engine: broken_prompter}}}}
"""
    server, url = start_gateway(
        tmp_path_factory.mktemp("fuzz"), config, env={"ALIGNPRO_API_KEYS": json.dumps([KEY])}
    )
    yield url
    server.stop()
    fi.stop()


def _openai_error(r: httpx.Response) -> bool:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


# ------------------------------------------------------------------------------------------ schemathesis
def test_schemathesis_finds_no_server_error(target: str) -> None:
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.core.result import Ok

    raw = httpx.get(f"{target}/openapi.json", headers=AUTH, timeout=10).json()
    assert "ChatCompletionRequest" in raw["components"]["schemas"]
    # Random model names only ever reach the 404; pin `model` to the served aliases so that most generated
    # requests go all the way through the prompter stage and the engine (the rest of the schema is as served).
    aliases = [m["id"] for m in httpx.get(f"{target}/v1/models", headers=AUTH).json()["data"]]
    for name in (
        "ChatCompletionRequest",
        "CompletionRequest",
        "RewriteRequest",
        "ResponsesRequest",
        "EmbeddingRequest",
        "TokenizeRequest",
    ):
        raw["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": aliases}
    schema = schemathesis.openapi.from_dict(raw)
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    results = list(schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in results), [r.err() for r in results if not isinstance(r, Ok)]
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert {op.path for op in operations} >= {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/alignpro/rewrite",
    }
    with httpx.Client(base_url=target, headers=AUTH, timeout=30) as client:
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz_operation(client, target, op, mode, statuses, failures)
    total = sum(statuses.values())
    print(f"schemathesis: {total} cases, statuses {dict(sorted(statuses.items()))}")
    assert total >= EXAMPLES * 4  # it did generate (more than a handful of operations x examples)
    assert statuses[200] > EXAMPLES  # and many were valid enough to be served
    assert not failures, "\n".join(failures[:10])


def _fuzz_operation(
    client: httpx.Client, target: str, op: Any, mode: Any, statuses: Counter[int], failures: list[str]
) -> None:
    """EXAMPLES generated cases of one operation in one mode (valid or invalid data)."""
    from hypothesis.errors import Unsatisfiable

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url=target)
        headers = {**(kwargs.get("headers") or {}), **AUTH}
        r = client.request(
            kwargs["method"],
            kwargs["url"],
            headers=headers,
            params=kwargs.get("params"),
            content=_body(kwargs),
        )
        statuses[r.status_code] += 1
        if r.status_code >= 500:
            failures.append(f"{kwargs['method']} {op.path} -> {r.status_code}: {r.text[:300]}")
        elif r.status_code >= 400:
            assert _openai_error(r), (op.path, r.status_code, r.text[:300])

    try:
        run()
    except Unsatisfiable:
        assert mode.value == "negative"  # an operation without parameters has no invalid input to make


def _body(kwargs: dict[str, Any]) -> bytes | None:
    if "json" in kwargs and kwargs["json"] is not None:
        return json.dumps(kwargs["json"]).encode()
    data = kwargs.get("data") or kwargs.get("content")
    if isinstance(data, str):
        return data.encode()
    return data if isinstance(data, bytes) else None


# ------------------------------------------------------------------------------------ hypothesis: JSON
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
VALID = {
    "/v1/chat/completions": {
        "model": "aligned",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
    },
    "/v1/completions": {"model": "ok", "prompt": "Hi", "max_tokens": 4},
    "/v1/alignpro/rewrite": {"model": "aligned", "prompt": "Hi"},
}
FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "n",
    "stream",
    "stop",
    "temperature",
    "top_p",
    "alignpro",
    "stream_options",
    "seed",
    "logprobs",
    "max_completion_tokens",
    "role",
    "content",
]


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[str, Any]:
    path = draw(st.sampled_from(sorted(VALID)))
    body: dict[str, Any] = json.loads(json.dumps(VALID[path]))
    field = draw(st.sampled_from(FIELDS))
    if field in ("role", "content") and "messages" in body:
        body["messages"][0][field] = draw(JSON)
    else:
        body[field] = draw(JSON)
    return path, body


@settings(max_examples=EXAMPLES * 5, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(case=near_valid() | st.tuples(st.sampled_from(sorted(VALID)), JSON))
def test_random_json_never_yields_a_server_error(target: str, case: tuple[str, Any]) -> None:
    path, body = case
    r = httpx.post(f"{target}{path}", content=json.dumps(body), headers=JSON_AUTH, timeout=30)
    assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert _openai_error(r), (path, body, r.text[:300])
    elif isinstance(body, dict) and body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]")


@settings(max_examples=EXAMPLES * 2, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_random_bytes_never_yield_a_server_error(target: str, raw: bytes) -> None:
    r = httpx.post(f"{target}/v1/chat/completions", content=raw, headers=JSON_AUTH, timeout=30)
    assert r.status_code in (400, 422) and _openai_error(r), (raw, r.status_code, r.text[:300])


# -------------------------------------------------------------------------------- hypothesis: SSE chunks
class _Pieces(UpstreamResponse):
    """A stream's answer made of the given pieces, with no connection behind it."""

    def __init__(self, pieces: list[bytes]) -> None:  # no aiohttp response to wrap
        self.pieces = pieces
        self.status_code = 200
        self.headers = {"content-type": "text/event-stream"}
        self._content = None

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        for p in self.pieces:
            yield p

    async def aclose(self) -> None:
        pass


class ChunkingUpstream(UpstreamClient):
    """A fault client: answers every stream with a given body, cut into the given pieces (over a real socket the
    kernel would merge them)."""

    def __init__(self, pieces: list[bytes]) -> None:
        super().__init__(httpx.Timeout(5.0), {}, 1)
        self.pieces = pieces

    async def stream(self, url: str, *, json: Any) -> UpstreamResponse:
        return _Pieces(self.pieces)


EVENT_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=30)


@st.composite
def chunked_stream(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """(events as relayed, the byte stream as sent, cut at arbitrary points; LF or CRLF line ends)."""
    texts = draw(st.lists(EVENT_TEXT, min_size=1, max_size=8))
    events = [
        b"data: "
        + json.dumps({"choices": [{"index": 0, "delta": {"content": t}}]}, ensure_ascii=False).encode()
        + b"\n\n"
        for t in texts
    ] + [b"data: [DONE]\n\n"]
    blob = b"".join(events)
    if draw(st.booleans()):  # SSE allows CRLF; the relay normalises it to LF
        blob = blob.replace(b"\n", b"\r\n")
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(blob) - 1)), max_size=20))))
    pieces = [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True) if blob[a:b]]
    return events, pieces


@settings(max_examples=EXAMPLES * 10, deadline=None, database=None)
@given(case=chunked_stream())
async def test_sse_events_survive_any_chunking(case: tuple[list[bytes], list[bytes]]) -> None:
    events, pieces = case
    engine = build_engine(
        "up", EngineConfig(kind="openai", urls=["http://upstream.invalid/v1"]), Timeouts.of(Settings())
    )
    assert isinstance(engine, OpenAIEngine)
    engine._client = ChunkingUpstream(pieces)
    try:
        out = [e async for e in engine.chat_stream({"model": "m", "messages": [], "stream": True})]
    finally:
        await engine._client.aclose()
    assert out == events
    assert engine.replicas[0].failures == 0 and engine.replicas[0].outstanding == 0


def test_gateway_fixture_is_a_real_process(target: str) -> None:
    """The fuzz target rejects unauthenticated calls: the fuzzers above really went through auth."""
    assert httpx.get(f"{target}/v1/models").status_code == 401
