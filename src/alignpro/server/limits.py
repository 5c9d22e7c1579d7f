"""Per-key admission: authentication, a request-rate token bucket, a concurrency cap, and draining.

:class:`Admission` is a plain ASGI middleware (not a ``BaseHTTPMiddleware``) because a concurrency slot must be
held until a streamed response has been sent in full or the client went away: the wrapped ``app(...)`` call
returns exactly then, so the slot is released in ``finally`` whatever happened.

Limits apply to the model routes (``/v1/...``); ``/ready`` and ``/metrics`` need a key but are not rate limited,
so monitoring keeps working while a key is throttled. ``/health`` needs nothing. Rejections are OpenAI-shaped:
401 (key), 429 with ``Retry-After`` (rate or concurrency), 503 while the server drains for shutdown.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from alignpro.errors import AlignProError, RateLimitError, UpstreamUnavailableError
from alignpro.server.auth import KeyStore
from alignpro.server.errors import error_response
from alignpro.server.shutdown import Drain

OPEN_PATHS = frozenset({"/health"})


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; a request takes one token."""

    rate: float
    capacity: float
    tokens: float = field(default=-1.0)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    def take(self, now: float | None = None) -> float:
        """Take a token: 0.0 when granted, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class KeyLimiter:
    """Requests per minute (token bucket) and concurrent requests, per caller id; 0 disables either."""

    def __init__(self, rpm: float = 0.0, burst: int = 0, max_concurrent: int = 0) -> None:
        self.rate = rpm / 60.0
        self.capacity = float(burst or max(1, math.ceil(rpm))) if rpm > 0 else 0.0
        self.max_concurrent = max_concurrent
        self._buckets: dict[str, TokenBucket] = {}
        self._inflight: dict[str, int] = {}
        self._lock = threading.Lock()  # acquire/release run on the event loop, but keep them safe anywhere

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.max_concurrent > 0

    def acquire(self, who: str) -> None:
        """Admit one request of ``who`` or raise :class:`RateLimitError`; pair with :meth:`release`."""
        with self._lock:
            if self.max_concurrent > 0 and self._inflight.get(who, 0) >= self.max_concurrent:
                raise RateLimitError(
                    f"too many concurrent requests for this API key (limit {self.max_concurrent})",
                    retry_after=1.0,
                    code="concurrency_limit_exceeded",
                )
            if self.rate > 0:
                bucket = self._buckets.get(who)
                if bucket is None:
                    bucket = self._buckets[who] = TokenBucket(self.rate, self.capacity)
                wait = bucket.take()
                if wait > 0:
                    raise RateLimitError(
                        f"rate limit of {self.rate * 60:g} requests per minute reached for this API key",
                        retry_after=wait,
                    )
            self._inflight[who] = self._inflight.get(who, 0) + 1

    def release(self, who: str) -> None:
        with self._lock:
            left = self._inflight.get(who, 0) - 1
            if left > 0:
                self._inflight[who] = left
            else:
                self._inflight.pop(who, None)

    def inflight(self, who: str) -> int:
        return self._inflight.get(who, 0)


class Admission:
    """ASGI middleware: drain check, API key, per-key limits; the caller goes to ``scope['state']``."""

    def __init__(self, app: ASGIApp, keys: KeyStore, limiter: KeyLimiter, drain: Drain) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        limited = scope["path"].startswith("/v1/") and self.limiter.enabled
        try:
            if self.drain.draining:
                raise UpstreamUnavailableError(
                    "the server is shutting down; retry on another instance",
                    code="shutting_down",
                    headers={"connection": "close", "retry-after": "1"},
                )
            auth = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    auth = value.decode("latin-1")
                    break
            principal = self.keys.authenticate(auth)
            if limited:
                self.limiter.acquire(principal.id)
        except AlignProError as exc:
            await error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()
            if limited:
                self.limiter.release(principal.id)
