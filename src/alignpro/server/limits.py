"""Per-key admission: authentication, request- and token-rate buckets, a concurrency cap, and draining.

:class:`Admission` is a plain ASGI middleware (not a ``BaseHTTPMiddleware``) because a concurrency slot must be
held until a streamed response has been sent in full or the client went away: the wrapped ``app(...)`` call
returns exactly then, so the slot is released in ``finally`` whatever happened.

Each key's limits are its own (:class:`~alignpro.settings.ApiKeyConfig`) or the gateway-wide settings. The rate
buckets live in a :class:`BucketStore`: this process's memory by default, or Redis
(:mod:`alignpro.server.shared`) so that every gateway replica draws on one bucket per key. Tokens per minute are
charged after the fact (the usage the frozen model reports): a key in debt is refused until the bucket refills.
The concurrency cap counts this process's requests only (a slot held in Redis would leak with a crashed pod).

Limits apply to the model routes (``/v1/...``); ``/ready`` and ``/metrics`` need a key but are not rate limited,
so monitoring keeps working while a key is throttled. ``/health`` needs nothing. Rejections are OpenAI-shaped:
401 (key), 429 with ``Retry-After`` (rate or concurrency), 503 while the server drains for shutdown.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from alignpro.errors import AlignProError, RateLimitError, UpstreamUnavailableError
from alignpro.server.auth import HostAllowList, KeyStore, Principal
from alignpro.server.errors import error_response
from alignpro.server.shutdown import Drain
from alignpro.settings import Settings

OPEN_PATHS = frozenset({"/health"})


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``capacity``."""

    rate: float
    capacity: float
    tokens: float = field(default=-1.0)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    def take(self, cost: float = 1.0, debt: bool = False, now: float | None = None) -> float:
        """Take ``cost`` tokens: 0.0 when granted, else the seconds until they are there (nothing taken).
        ``debt``: take them even below zero (a charge for what was already served); ``cost`` 0: is it in debt?"""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if debt or self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class BucketStore(Protocol):
    """Where the token buckets live; ``key`` names one bucket (a caller and what it limits)."""

    async def take(
        self, key: str, rate: float, capacity: float, cost: float, debt: bool = False
    ) -> float: ...


class LocalBuckets:
    """Token buckets in this process's memory."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}

    def take_now(self, key: str, rate: float, capacity: float, cost: float, debt: bool = False) -> float:
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate or bucket.capacity != capacity:
            bucket = self._buckets[key] = TokenBucket(rate, capacity)
        return bucket.take(cost, debt)

    async def take(self, key: str, rate: float, capacity: float, cost: float, debt: bool = False) -> float:
        return self.take_now(key, rate, capacity, cost, debt)


@dataclass(frozen=True)
class Limits:
    """One key's limits; 0 disables each."""

    rpm: float = 0.0
    burst: int = 0
    tpm: float = 0.0
    max_concurrent: int = 0

    @property
    def any(self) -> bool:
        return self.rpm > 0 or self.tpm > 0 or self.max_concurrent > 0

    @property
    def request_capacity(self) -> float:
        return float(self.burst or max(1, math.ceil(self.rpm)))


class KeyLimiter:
    """Requests and tokens per minute (token buckets in ``store``) and concurrent requests, per caller."""

    def __init__(self, defaults: Limits | None = None, store: BucketStore | None = None) -> None:
        self.defaults = defaults or Limits()
        self.store: BucketStore = store or LocalBuckets()
        self._inflight: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings, store: BucketStore | None = None) -> KeyLimiter:
        s = settings
        return cls(
            Limits(s.rate_limit_rpm, s.rate_limit_burst, s.rate_limit_tpm, s.max_concurrent_per_key), store
        )

    def limits(self, who: Principal) -> Limits:
        d = self.defaults

        def pick(own: float | None, default: float) -> float:
            return default if own is None else own

        return Limits(
            rpm=pick(who.rate_limit_rpm, d.rpm),
            # A key's own rpm without a burst gets one minute's worth, not the gateway's burst for another rate.
            burst=d.burst if who.rate_limit_rpm is None else 0,
            tpm=pick(who.rate_limit_tpm, d.tpm),
            max_concurrent=int(pick(who.max_concurrent, d.max_concurrent)),
        )

    async def acquire(self, who: Principal, lim: Limits) -> None:
        """Admit one request of ``who`` or raise :class:`RateLimitError`; pair with :meth:`release`."""
        if lim.max_concurrent > 0 and self._inflight.get(who.id, 0) >= lim.max_concurrent:
            raise RateLimitError(
                f"too many concurrent requests for this API key (limit {lim.max_concurrent})",
                retry_after=1.0,
                code="concurrency_limit_exceeded",
            )
        if lim.tpm > 0:
            wait = await self.store.take(f"{who.id}:tpm", lim.tpm / 60.0, lim.tpm, 0.0)
            if wait > 0:
                raise RateLimitError(
                    f"token rate limit of {lim.tpm:g} tokens per minute reached for this API key",
                    retry_after=wait,
                    code="token_rate_limit_exceeded",
                )
        if lim.rpm > 0:
            wait = await self.store.take(f"{who.id}:rpm", lim.rpm / 60.0, lim.request_capacity, 1.0)
            if wait > 0:
                raise RateLimitError(
                    f"rate limit of {lim.rpm:g} requests per minute reached for this API key",
                    retry_after=wait,
                )
        self._inflight[who.id] = self._inflight.get(who.id, 0) + 1

    def release(self, who: Principal) -> None:
        left = self._inflight.get(who.id, 0) - 1
        if left > 0:
            self._inflight[who.id] = left
        else:
            self._inflight.pop(who.id, None)

    async def charge_tokens(self, who: Principal, tokens: int) -> None:
        """Charge ``tokens`` served to ``who`` against its tokens-per-minute bucket (it may go into debt)."""
        tpm = self.limits(who).tpm
        if tpm > 0 and tokens > 0:
            await self.store.take(f"{who.id}:tpm", tpm / 60.0, tpm, float(tokens), debt=True)

    def inflight(self, who: Principal) -> int:
        return self._inflight.get(who.id, 0)


class Admission:
    """ASGI middleware: drain check, API key, per-key limits; the caller goes to ``scope['state']``."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyStore,
        limiter: KeyLimiter,
        drain: Drain,
        hosts: HostAllowList | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.drain = drain
        self.hosts = hosts or HostAllowList(["*"], keys.enabled)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        limits = None
        try:
            if self.drain.draining:
                raise UpstreamUnavailableError(
                    "the server is shutting down; retry on another instance",
                    code="shutting_down",
                    headers={"connection": "close", "retry-after": "1"},
                )
            wanted: dict[bytes, str | None] = {b"authorization": None, b"host": None, b"origin": None}
            for name, value in scope["headers"]:
                if name in wanted and wanted[name] is None:
                    wanted[name] = value.decode("latin-1")
            self.hosts.check(wanted[b"host"], wanted[b"origin"])
            auth = wanted[b"authorization"]
            principal = self.keys.authenticate(auth)
            if scope["path"].startswith("/v1/") or scope["path"] == "/tokenize":
                limits = self.limiter.limits(principal)
                if limits.any:
                    await self.limiter.acquire(principal, limits)
                else:
                    limits = None
        except AlignProError as exc:
            await error_response(exc)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["principal"] = principal
        if "call" in state:
            state["call"].key_id = principal.id
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()
            if limits is not None:
                self.limiter.release(principal)
