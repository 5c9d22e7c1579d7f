"""One way to name an engine and one way to build it, for the gateway, the evaluator and the trainers alike.

A model is named by an engine spec: ``local:embedded``, ``local:/path/to/model`` (in-process, transformers) or
``openai:http://host:port/v1#model`` (any OpenAI-compatible server, vLLM in practice). :class:`EngineSpec` parses
it; :func:`split_url_model` is the ``URL#model`` part, which the judge reward's spec shares. :func:`build_engine`
turns an :class:`~alignpro.settings.EngineConfig` into a started-on-demand :class:`~alignpro.engines.base.Engine`.

Importing this module needs only the base install: the local engine (torch) is imported when one is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alignpro.engines.base import Engine
from alignpro.errors import ConfigError
from alignpro.settings import EngineConfig, Settings


@dataclass(frozen=True)
class Timeouts:
    """Seconds an upstream call may take: to connect, between two reads, to write, to wait for a pooled
    connection (default: as long as to connect), and in all."""

    connect_s: float
    read_s: float
    request_s: float
    write_s: float = 30.0
    pool_s: float | None = None

    @classmethod
    def of(cls, settings: Settings) -> Timeouts:
        return cls(settings.connect_timeout_s, settings.read_timeout_s, settings.request_timeout_s)


# Training and evaluation queue hundreds of requests on a server that may be slow (vLLM-CPU): a request can wait
# long for its turn, and one slow answer must not eject the only replica.
BATCH_TIMEOUTS = Timeouts(connect_s=10.0, read_s=3600.0, request_s=7200.0, write_s=60.0, pool_s=3600.0)
BATCH_FAILURE_THRESHOLD = 1000


def split_url_model(text: str, what: str = "engine") -> tuple[str, str]:
    """``http://host:port/v1#model`` as ``(url, model)``; a :class:`ConfigError` naming ``what`` otherwise."""
    url, hash_, model = text.strip().rpartition("#")
    if not hash_ or not url.startswith(("http://", "https://")) or not model:
        raise ConfigError(f"{what} spec {text!r} must look like http://host:port/v1#model")
    return url.rstrip("/"), model


@dataclass(frozen=True)
class EngineSpec:
    """A model to run: ``local:embedded``, ``local:/path/to/model`` or ``openai:http://host:port/v1#model``."""

    kind: str  # "local" | "openai"
    model: str  # local: a folder or "embedded"; openai: the served model id
    url: str | None = None

    @classmethod
    def parse(cls, spec: str) -> EngineSpec:
        spec = spec.strip()
        kind, sep, rest = spec.partition(":")
        if not sep and kind in ("local", "embedded"):
            return cls("local", "embedded")
        if kind == "local" and rest:
            return cls("local", rest)
        if kind == "openai" and rest:
            url, model = split_url_model(rest)
            return cls("openai", model, url)
        raise ConfigError(
            f"unknown model spec {spec!r}; expected local:embedded, local:/path or openai:http://host:port/v1#model"
        )

    def engine_config(
        self, *, dtype: str = "float32", batch_size: int = 16, adapters: dict[str, str] | None = None
    ) -> EngineConfig:
        """The config of an engine for batch work (eval, training) on this model."""
        if self.kind == "local":
            # A longer batch wait than the gateway's: batch work submits many prompts at once and wants full
            # batches.
            return EngineConfig(
                kind="local",
                model=self.model,
                adapters=dict(adapters or {}),
                dtype=dtype,
                max_batch_size=batch_size,
                batch_wait_ms=20.0,
            )
        assert self.url is not None
        return EngineConfig(kind="openai", model=self.model, urls=[self.url])

    def __str__(self) -> str:
        return f"openai:{self.url}#{self.model}" if self.kind == "openai" else f"local:{self.model}"


def build_engine(name: str, cfg: EngineConfig, timeouts: Timeouts) -> Engine:
    """The engine ``cfg`` describes, named ``name`` (its requests are not sent until it is started)."""
    if cfg.kind == "local":
        from alignpro.engines.local import LocalEngine

        return LocalEngine(name, cfg)
    import httpx

    from alignpro.engines.openai import OpenAIEngine

    pool = timeouts.connect_s if timeouts.pool_s is None else timeouts.pool_s
    timeout = httpx.Timeout(
        connect=timeouts.connect_s, read=timeouts.read_s, write=timeouts.write_s, pool=pool
    )
    return OpenAIEngine(name, cfg, timeout, timeouts.request_s)


def build_frozen_engine(
    kind: str,
    model: str = "embedded",
    urls: Sequence[str] = (),
    dtype: str = "float32",
    max_batch_size: int = 16,
) -> Engine:
    """The frozen model for training: ``local`` (in-process) or ``openai`` (``urls``, vLLM replicas over HTTP)."""
    if kind == "local":
        cfg = EngineSpec("local", model).engine_config(dtype=dtype, batch_size=max_batch_size)
    else:
        cfg = EngineConfig(
            kind="openai", model=model, urls=list(urls), failure_threshold=BATCH_FAILURE_THRESHOLD
        )
    return build_engine("frozen", cfg, BATCH_TIMEOUTS)
