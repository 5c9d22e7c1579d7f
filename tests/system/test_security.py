"""Security of the gateway: API keys on every route, per-key model allow-lists, rate and concurrency limits,
size caps, and keys never showing up in logs, errors or metrics.

A real gateway process on loopback in front of the FaultInjector (an instant, deliberately breakable OpenAI
upstream); its log is captured to a file and searched for the keys at the end.
"""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alignpro.errors import AuthenticationError, PermissionDeniedError, RateLimitError
from alignpro.server.auth import KeyStore, Principal
from alignpro.server.limits import KeyLimiter, Limits, TokenBucket
from alignpro.settings import ApiKeyConfig, parse_key_entry
from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import Server, free_port, start_gateway

KEYS = {
    "auth": "sk-auth-7d1f0c2b9e",
    "rate": "sk-rate-3a8e5f10cc",
    "conc": "sk-conc-91b2d4e6f0",
    "limited": "sk-limited-5c0e7a",
    "caps": "sk-caps-2f9d8b1e4a",
}
FILE_KEY = "sk-from-file-66ab90"
WRONG = "sk-wrong-0000deadbeef"
BURST = 8
CONCURRENT = 2


def hdr(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat(model: str = "ok", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], **extra}


# ------------------------------------------------------------------------------------------ pure parts
def _store(*entries: str) -> KeyStore:
    return KeyStore([ApiKeyConfig.model_validate(parse_key_entry(e)) for e in entries])


def test_key_entries_and_allow_lists() -> None:
    assert parse_key_entry("sk-a") == {"key": "sk-a"}
    assert parse_key_entry(" sk-a : x, y ,") == {"key": "sk-a", "aliases": ["x", "y"]}
    store = _store("sk-a", "sk-b:x")
    assert store.authenticate("Bearer sk-a").may_use("anything")
    b = store.authenticate("bearer   sk-b ")
    assert b.may_use("x") and not b.may_use("y")
    with pytest.raises(PermissionDeniedError):
        b.check("y")
    for bad in (None, "", "sk-a", "Bearer ", "Bearer sk-c", "Basic sk-a", "Bearer sk-a2"):
        with pytest.raises(AuthenticationError) as err:
            store.authenticate(bad)
        assert "sk-" not in err.value.message
    assert KeyStore([]).authenticate(None).id == "anonymous"


def test_keys_are_kept_hashed() -> None:
    """Nothing reachable from the store (its pickle, its principals' ids) holds a key's text."""
    store = _store("sk-secret-123456:alias")
    blob = pickle.dumps(store)
    assert b"sk-secret-123456" not in blob
    who = store.authenticate("Bearer sk-secret-123456")
    assert who.id.startswith("key-") and "secret" not in who.id


def test_keys_file(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# ops keys\n\nsk-one\nsk-two: a,b\n")
    store = KeyStore.from_settings([ApiKeyConfig(key="sk-zero")], f)
    assert len(store) == 3
    assert store.authenticate("Bearer sk-two").aliases == frozenset({"a", "b"})


def test_token_bucket_refills_at_its_rate() -> None:
    b = TokenBucket(rate=2.0, capacity=3, stamp=100.0)
    assert [b.take(now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(now=100.0) == pytest.approx(0.5)  # one token every 0.5 s
    assert b.take(now=100.5) == 0.0
    assert b.take(now=110.0) == 0.0 and b.tokens == pytest.approx(2.0)  # capped at capacity, minus one
    # A charge after the fact may take it into debt; then even a zero-cost check waits for the refill.
    assert b.take(10, debt=True, now=110.0) == 0.0 and b.tokens == pytest.approx(-8.0)
    assert b.take(0.0, now=110.0) == pytest.approx(4.0)


async def test_limiter_counts_per_key_and_releases() -> None:
    lim = KeyLimiter(Limits(rpm=60, burst=2, max_concurrent=1))
    a, b = Principal("a"), Principal("b")
    await lim.acquire(a, lim.limits(a))
    with pytest.raises(RateLimitError) as err:
        await lim.acquire(a, lim.limits(a))  # concurrency 1 reached
    assert err.value.code == "concurrency_limit_exceeded" and err.value.headers["retry-after"] == "1"
    await lim.acquire(b, lim.limits(b))  # another key is not affected
    lim.release(a)
    await lim.acquire(a, lim.limits(a))
    lim.release(a)
    with pytest.raises(RateLimitError) as err:
        await lim.acquire(a, lim.limits(a))  # the bucket of 2 is spent
    assert int(err.value.headers["retry-after"]) >= 1
    assert lim.inflight(a) == 0 and lim.inflight(b) == 1


# ------------------------------------------------------------------------------------- a real gateway
@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultInjector]:
    fi = FaultInjector(free_port()).start()
    yield fi
    fi.stop()


@pytest.fixture(scope="module")
def secured(
    upstream: FaultInjector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Server]]:
    tmp = tmp_path_factory.mktemp("secured")
    keys_file = tmp / "keys.txt"
    keys_file.write_text(f"# loaded from a file\n{FILE_KEY}\n")
    entries = [KEYS["auth"], KEYS["rate"], KEYS["conc"], f"{KEYS['limited']}:ok", KEYS["caps"]]
    config = f"""
engines:
  fi: {{kind: openai, urls: ["{upstream.url}"], model: ok}}
aliases:
  ok: {{engine: fi, prompter: {{mode: off}}}}
  slow: {{engine: fi, model: slowstream-0.4, prompter: {{mode: off}}}}
max_messages: 8
max_tokens_cap: 100
max_body_bytes: 4096
rate_limit_rpm: 60
rate_limit_burst: {BURST}
max_concurrent_per_key: {CONCURRENT}
"""
    env = {
        "ALIGNPRO_API_KEYS": json.dumps(entries),
        "ALIGNPRO_API_KEYS_FILE": str(keys_file),
        "ALIGNPRO_LOG_LEVEL": "debug",  # the most the gateway ever logs
    }
    server, url = start_gateway(tmp, config, env=env)
    yield url, server
    server.stop()


ROUTES = [
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/alignpro/rewrite"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/no/such/route"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_but_health_needs_a_key(secured: tuple[str, Server], method: str, path: str) -> None:
    url, _ = secured
    body = (
        (chat() if path.endswith("/chat/completions") else {"model": "ok", "prompt": "Hi"})
        if method == "POST"
        else None
    )
    for headers in (
        {},
        hdr(WRONG),
        {"authorization": KEYS["auth"]},
        {"authorization": "Basic " + KEYS["auth"]},
    ):
        r = httpx.request(method, url + path, json=body, headers=headers, timeout=10)
        assert r.status_code == 401, (headers, r.text)
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        assert "sk-" not in r.text and r.headers["x-request-id"]
    r = httpx.request(method, url + path, json=body, headers=hdr(KEYS["auth"]), timeout=10)
    assert r.status_code != 401
    assert r.status_code == (404 if path == "/no/such/route" else 200), r.text


def test_health_is_open(secured: tuple[str, Server]) -> None:
    url, _ = secured
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_key_from_the_keys_file(secured: tuple[str, Server]) -> None:
    url, _ = secured
    r = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers=hdr(FILE_KEY), timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"


def test_model_allow_list(secured: tuple[str, Server]) -> None:
    url, _ = secured
    h = hdr(KEYS["limited"])
    assert [m["id"] for m in httpx.get(f"{url}/v1/models", headers=h).json()["data"]] == ["ok"]
    assert httpx.post(f"{url}/v1/chat/completions", json=chat("ok"), headers=h).status_code == 200
    r = httpx.post(f"{url}/v1/chat/completions", json=chat("slow", stream=True), headers=h)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = httpx.post(f"{url}/v1/alignpro/rewrite", json={"model": "slow", "prompt": "x"}, headers=h)
    assert r.status_code == 403
    r = httpx.post(f"{url}/v1/chat/completions", json=chat("nope"), headers=h)
    assert r.status_code == 404 and "slow" not in r.text  # the other aliases stay hidden
    # An unrestricted key sees every alias.
    assert {m["id"] for m in httpx.get(f"{url}/v1/models", headers=hdr(KEYS["auth"])).json()["data"]} == {
        "ok",
        "slow",
    }


def test_rate_limit_answers_429_with_retry_after(secured: tuple[str, Server]) -> None:
    url, _ = secured
    h = hdr(KEYS["rate"])
    with httpx.Client(timeout=10) as c:
        statuses = [c.post(f"{url}/v1/chat/completions", json=chat(), headers=h) for _ in range(BURST + 4)]
        codes = [r.status_code for r in statuses]
        # The bucket holds BURST; it refills at one a second, so at most one more gets through meanwhile.
        assert BURST <= codes.count(200) <= BURST + 1 and set(codes) == {200, 429}, codes
        limited = next(r for r in statuses if r.status_code == 429)
        assert limited.json()["error"]["type"] == "rate_limit_error"
        wait = int(limited.headers["retry-after"])
        assert 1 <= wait <= 2
        # Another key is not throttled, and /metrics is not limited at all.
        assert c.post(f"{url}/v1/chat/completions", json=chat(), headers=hdr(KEYS["caps"])).status_code == 200
        assert c.get(f"{url}/metrics", headers=h).status_code == 200
        time.sleep(wait)
        assert c.post(f"{url}/v1/chat/completions", json=chat(), headers=h).status_code == 200


def test_concurrency_limit_holds_for_the_whole_stream(secured: tuple[str, Server]) -> None:
    """Two streams of ~2.4 s hold both slots until their last byte; a third request meanwhile gets 429."""
    url, _ = secured
    h = hdr(KEYS["conc"])
    done: list[list[str]] = []

    def stream() -> None:
        body = chat("slow", stream=True)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=h, timeout=20) as r:
            done.append([line for line in r.iter_lines() if line.startswith("data: ")])

    threads = [threading.Thread(target=stream) for _ in range(CONCURRENT)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # both streams are under way
    r = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers=h, timeout=10)
    assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert r.headers["retry-after"] == "1"
    for t in threads:
        t.join(timeout=20)
    assert len(done) == CONCURRENT and all(events[-1] == "data: [DONE]" for events in done)
    time.sleep(1.1)  # the token bucket (8 + 1/s) has room again
    assert httpx.post(f"{url}/v1/chat/completions", json=chat(), headers=h, timeout=10).status_code == 200


def test_a_client_that_leaves_frees_its_slot(secured: tuple[str, Server]) -> None:
    url, _ = secured
    h = hdr(KEYS["conc"])
    for _ in range(CONCURRENT):
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=chat("slow", stream=True), headers=h
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up mid-stream
    time.sleep(0.5)
    assert httpx.post(f"{url}/v1/chat/completions", json=chat(), headers=h, timeout=10).status_code == 200


def test_size_and_count_caps(secured: tuple[str, Server]) -> None:
    url, _ = secured
    h = hdr(KEYS["caps"])
    with httpx.Client(timeout=10, headers=h) as c:
        big = chat(messages=[{"role": "user", "content": "x" * 5000}])
        r = c.post(f"{url}/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
            yield b'{"model": "ok", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'

        r = c.post(
            f"{url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        many = chat(messages=[{"role": "user", "content": "x"}] * 9)
        r = c.post(f"{url}/v1/chat/completions", json=many)
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages"
        r = c.post(f"{url}/v1/chat/completions", json=chat(max_tokens=101))
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = c.post(f"{url}/v1/completions", json={"model": "ok", "prompt": "x", "n": 17})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert c.post(f"{url}/v1/chat/completions", json=chat(max_tokens=100)).status_code == 200


def test_keys_never_reach_logs_or_metrics(secured: tuple[str, Server]) -> None:
    """Runs last in this module: the log then holds every request above, good and bad keys alike."""
    url, server = secured
    for key in (WRONG, KEYS["auth"]):
        httpx.post(f"{url}/v1/chat/completions", json=chat("nope"), headers=hdr(key), timeout=10)
    metrics = httpx.get(f"{url}/metrics", headers=hdr(KEYS["auth"])).text
    assert server.log_path is not None
    log = server.log_path.read_text(errors="replace")
    assert "POST /v1/chat/completions" in log and "401" in log  # the log does record these requests
    for secret in [*KEYS.values(), FILE_KEY, WRONG]:
        assert secret not in log, f"a key leaked into the gateway log: {secret[:6]}..."
        assert secret not in metrics
