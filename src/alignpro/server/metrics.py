"""Prometheus metrics of one gateway (a registry per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "alignpro_requests",
            "Requests answered, by route, alias and status.",
            ["route", "alias", "status"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "alignpro_stage_seconds",
            "Latency of a stage (prompter, frozen).",
            ["stage", "alias"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "alignpro_tokens", "Tokens reported by the frozen model.", ["alias", "kind"], registry=r
        )
        self.errors = Counter("alignpro_errors", "Errors by type.", ["type"], registry=r)
        self.fallbacks = Counter(
            "alignpro_prompter_fallbacks",
            "Requests served with the original prompt, by reason.",
            ["reason"],
            registry=r,
        )
        self.cache_hits = Counter("alignpro_rewrite_cache_hits", "Rewrite cache hits.", registry=r)
        self.cache_misses = Counter("alignpro_rewrite_cache_misses", "Rewrite cache misses.", registry=r)
        self.inflight = Gauge("alignpro_inflight_requests", "Requests being served.", registry=r)
