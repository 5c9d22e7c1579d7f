"""Prometheus metrics of one gateway (a registry per app, so tests can run several).

Every label takes values from a bounded set, whatever clients send: ``route`` is the matched route's template
(``unrouted`` for a request that reached none: an unknown path, or one refused before routing), ``alias`` a
configured alias (``unknown`` for any other model name, empty where a route names none), ``status`` an HTTP
status, ``reason`` and ``outcome`` values the gateway itself defines. So the number of series stays flat under
random paths and model names (tests/system/test_metrics.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from starlette.types import Scope

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
UNROUTED = "unrouted"
UNKNOWN_ALIAS = "unknown"


class Metrics:
    def __init__(self, aliases: Iterable[str] = ()) -> None:
        self.aliases = frozenset(aliases)
        r = self.registry = CollectorRegistry()
        # process_* (CPU, memory, file descriptors), python_gc_*, python_info: what a pod's dashboard plots.
        ProcessCollector(registry=r)
        for shared in (PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(shared)
        self.requests = Counter(
            "alignpro_requests",
            "Requests answered, by route template, alias and status.",
            ["route", "alias", "status"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "alignpro_stage_seconds",
            "Latency of a stage: prompter (x -> x'), frozen (the frozen model's whole answer).",
            ["stage", "alias"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompter_seconds = Histogram(
            "alignpro_prompter_seconds",
            "Latency of the prompter stage by what it did: rewritten, kept (KEEP), gated, fallback, cached.",
            ["alias", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "alignpro_time_to_first_token_seconds",
            "Streamed requests: from the request's arrival to the frozen model's first event (prompter included).",
            ["alias"],
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
        self.speculative = Counter(
            "alignpro_speculative_starts",
            "Speculative starts of the frozen model by outcome: released (the prompter kept the request) or "
            "discarded (it rewrote it; the tokens generated so far were spent for nothing).",
            ["alias", "outcome"],
            registry=r,
        )
        self.cache_hits = Counter("alignpro_rewrite_cache_hits", "Rewrite cache hits.", registry=r)
        self.cache_misses = Counter("alignpro_rewrite_cache_misses", "Rewrite cache misses.", registry=r)
        self.inflight = Gauge("alignpro_inflight_requests", "Requests being served.", registry=r)

    def alias_label(self, name: str | None) -> str:
        """``name`` when it is a configured alias; ``unknown`` for any other model name; empty for none."""
        if not name:
            return ""
        return name if name in self.aliases else UNKNOWN_ALIAS

    def count_request(self, scope: Scope, status: int) -> str:
        """Count a finished request (the alias is what the route read from the body, after authentication);
        the route label."""
        route = scope.get("route")
        template = getattr(route, "path", None) or UNROUTED
        alias = self.alias_label(scope.get("state", {}).get("alias"))
        if status >= 400:
            self.errors.labels(str(status)).inc()
        self.requests.labels(template, alias, str(status)).inc()
        return template
