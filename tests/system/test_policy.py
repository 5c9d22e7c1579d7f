"""Per-key policy and what ``rewritten`` means.

Keys come from the environment as users of other gateways write them (``sk-1``, ``sk-1,sk-2``) or as a JSON list
of policy objects; each key may use some aliases, may or may not override the prompter mode, sees the rewrite
or not, and has its own limits. The gateway runs in this process over ``httpx.ASGITransport`` in front of the
FaultInjector (a real HTTP upstream on loopback), whose ``say-<text>`` models script the prompter's output.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from alignpro.cli.main import main
from alignpro.errors import ConfigError
from alignpro.server.app import create_app
from alignpro.settings import Settings, load_settings
from alignpro.testing.faults import FaultInjector

PROMPT = "How does photosynthesis work in plants?"
REWRITE = "Explain step by step how photosynthesis works in green plants."


def _settings(faults: FaultInjector, **extra: Any) -> Settings:
    def engine(model: str) -> dict[str, Any]:
        return {"kind": "openai", "urls": [faults.url], "model": model}

    return Settings(
        engines={"frozen": engine("ok"), "keeper": engine("say-KEEP"), "writer": engine(f"say-{REWRITE}")},
        aliases={
            "kept": {"engine": "frozen", "prompter": {"mode": "reference", "engine": "keeper"}},
            "aligned": {
                "engine": "frozen",
                "prompter": {"mode": "reference", "engine": "writer", "allowed_modes": ["off"]},
            },
            "plain": {"engine": "frozen", "prompter": {"mode": "off"}},
        },
        rewrite_cache_size=0,
        **extra,
    )


@asynccontextmanager
async def _gateway(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")
    async with app.router.lifespan_context(app), http:
        yield http


def _chat(model: str, key: str | None = None, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], **extra}
    return {"json": body, "headers": {"authorization": f"Bearer {key}"} if key else {}}


# ------------------------------------------------------------------------------------ rewritten vs kept
async def test_keep_is_reported_as_kept_not_rewritten(faults: FaultInjector) -> None:
    async with _gateway(_settings(faults)) as c:
        kept = await c.post("/v1/chat/completions", **_chat("kept"))
        changed = await c.post("/v1/chat/completions", **_chat("aligned"))
    assert kept.status_code == 200 and changed.status_code == 200, (kept.text, changed.text)
    info = kept.json()["alignpro"]
    assert info["rewritten"] is False and info["kept"] is True and "fallback" not in info, info
    assert info["rewritten_prompt"] == PROMPT and kept.headers["x-alignpro-rewritten"] == "false"
    info = changed.json()["alignpro"]
    assert info["rewritten"] is True and info["kept"] is False and info["rewritten_prompt"] == REWRITE, info
    assert changed.headers["x-alignpro-rewritten"] == "true"
    # What reached the frozen model: the original for KEEP, the rewrite otherwise.
    sent = [b["messages"][-1]["content"] for b in faults.last_bodies if b["model"] == "ok"][-2:]
    assert sent == [PROMPT, REWRITE]


# ------------------------------------------------------------------------------------ keys from the environment
@pytest.mark.parametrize(
    ("value", "count"),
    [("sk-1", 1), ("sk-1, sk-2,sk-3", 3), ('["sk-1", "sk-2:plain"]', 2), ('[{"key": "sk-1"}]', 1)],
)
def test_api_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, count: int) -> None:
    monkeypatch.setenv("ALIGNPRO_API_KEYS", value)
    keys = load_settings().api_keys
    assert len(keys) == count and keys[0].key.get_secret_value() == "sk-1"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("sk-1:a,b", "per-key aliases as a JSON list"),
        ('["sk-1"', "not valid JSON"),
        ('[{"key": "sk-1", "rate_limit_rpm": -1}]', "api_keys.0.rate_limit_rpm"),
        ('[{"key": "sk-1", "colour": "red"}]', "api_keys.0.colour"),
    ],
)
def test_bad_api_keys_are_a_clear_config_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str, why: str
) -> None:
    monkeypatch.setenv("ALIGNPRO_API_KEYS", value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert why in err.value.message and "sk-1" not in err.value.message, err.value.message
    # The command line says it in one line, no traceback, and exits 2.
    assert main(["serve", "--port", "0"]) == 2
    out = capsys.readouterr().err
    assert out.startswith("alignpro: ") and why in out and "Traceback" not in out, out


def test_keys_file_with_policies(tmp_path: Any) -> None:
    from alignpro.server.auth import KeyStore

    f = tmp_path / "keys.yaml"
    f.write_text("- {key: sk-ops, allow_mode_override: true, reveal_rewrite: true}\n- sk-app:plain\n")
    store = KeyStore.from_settings([], f)
    ops, app = store.authenticate("Bearer sk-ops"), store.authenticate("Bearer sk-app")
    assert ops.allow_mode_override is True and ops.reveal_rewrite is True and ops.aliases is None
    assert app.allow_mode_override is None and app.aliases == frozenset({"plain"})
    f.write_text("- {key: sk-ops, max_concurrent: lots}\n")
    with pytest.raises(ConfigError) as err:
        KeyStore.from_settings([], f)
    assert "max_concurrent" in err.value.message and "sk-ops" not in err.value.message


# ------------------------------------------------------------------------------------ policy per key
KEYS = [
    {"key": "sk-ops", "allow_mode_override": True, "reveal_rewrite": True},
    {"key": "sk-app"},  # the gateway's defaults below: no override, no reveal
    {"key": "sk-narrow", "aliases": ["plain"], "rate_limit_rpm": 2},
    {"key": "sk-tokens", "rate_limit_tpm": 6},
]


async def test_each_key_has_its_own_policy(faults: FaultInjector) -> None:
    settings = _settings(faults, api_keys=KEYS, allow_mode_override=False, reveal_rewrite=False)
    async with _gateway(settings) as c:
        off = {"alignpro": {"mode": "off"}}
        r = await c.post("/v1/chat/completions", **_chat("aligned", "sk-app", **off))
        assert r.status_code == 403 and r.json()["error"]["code"] == "override_not_allowed", r.text
        r = await c.post("/v1/chat/completions", **_chat("aligned", "sk-ops", **off))
        assert r.status_code == 200 and r.json()["alignpro"]["mode"] == "off", r.text
        # Reveal: the app key learns that a rewrite happened, not what it was; the ops key sees both.
        hidden = (await c.post("/v1/chat/completions", **_chat("aligned", "sk-app"))).json()["alignpro"]
        shown = (await c.post("/v1/chat/completions", **_chat("aligned", "sk-ops"))).json()["alignpro"]
        assert (
            hidden["rewritten"] is True
            and "rewritten_prompt" not in hidden
            and "original_prompt" not in hidden
        )
        assert shown["rewritten_prompt"] == REWRITE
        rw: dict[str, Any] = {"json": {"model": "aligned", "prompt": PROMPT}}
        r = await c.post("/v1/alignpro/rewrite", headers={"authorization": "Bearer sk-app"}, **rw)
        assert r.status_code == 403 and r.json()["error"]["code"] == "rewrite_hidden"
        r = await c.post("/v1/alignpro/rewrite", headers={"authorization": "Bearer sk-ops"}, **rw)
        assert r.status_code == 200 and r.json()["prompt"] == REWRITE
        # Aliases and a request rate of the key's own.
        r = await c.post("/v1/chat/completions", **_chat("aligned", "sk-narrow"))
        assert r.status_code == 403
        codes = [
            (await c.post("/v1/chat/completions", **_chat("plain", "sk-narrow"))).status_code
            for _ in range(2)
        ]
        # 2 a minute: the refused request above took one (limits admit a request before its body is read).
        assert codes == [200, 429], codes
        assert (await c.post("/v1/chat/completions", **_chat("plain", "sk-app"))).status_code == 200


async def test_tokens_per_minute_are_charged_from_usage(faults: FaultInjector) -> None:
    """The upstream reports 4 tokens a request; 6 a minute admits two requests (the second goes into debt),
    then refuses until the bucket has refilled (20 s at 0.1 token/s)."""
    async with _gateway(_settings(faults, api_keys=KEYS)) as c:
        rs = [await c.post("/v1/chat/completions", **_chat("plain", "sk-tokens")) for _ in range(3)]
        assert [r.status_code for r in rs] == [200, 200, 429], [r.text for r in rs]
        err = rs[-1].json()["error"]
        assert err["code"] == "token_rate_limit_exceeded" and err["type"] == "rate_limit_error"
        assert 15 <= int(rs[-1].headers["retry-after"]) <= 21
        # Other keys are not charged.
        assert (await c.post("/v1/chat/completions", **_chat("plain", "sk-app"))).status_code == 200


async def test_streams_are_charged_too(faults: FaultInjector) -> None:
    """A stream whose client did not ask for usage is charged all the same (the gateway asks the upstream for it)
    and the client does not get the usage chunk it did not ask for; one that asked gets it."""
    async with _gateway(_settings(faults, api_keys=KEYS)) as c:
        bodies = []
        for _ in range(2):
            r = await c.post("/v1/chat/completions", **_chat("plain", "sk-tokens", stream=True))
            assert r.status_code == 200, r.text
            bodies.append(r.text)
        r = await c.post("/v1/chat/completions", **_chat("plain", "sk-tokens", stream=True))
        assert r.status_code == 429 and r.json()["error"]["code"] == "token_rate_limit_exceeded"
        assert all('"usage"' not in b and b.endswith("data: [DONE]\n\n") for b in bodies), bodies
        asked = await c.post(
            "/v1/chat/completions",
            **_chat("plain", "sk-app", stream=True, stream_options={"include_usage": True}),
        )
        assert '"usage":{' in asked.text.replace(" ", "")
