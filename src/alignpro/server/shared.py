"""State shared by every gateway replica, on Redis: the per-key rate buckets and the rewrite cache.

With ``redis_url`` set, each gateway process draws on one token bucket per key and limit (so a key's limit holds
across 2-8 pods instead of being multiplied by their number) and reads the rewrites the other replicas made.
Without it, both stay in process memory (the default).

Redis going away never fails a request: a call that errors or takes longer than ``redis_timeout_s`` is served
from this process's memory instead, with one warning in the log; Redis is tried again every
``redis_retry_s`` (meanwhile no request waits on it) and an info line says when it is back. During the outage a
key's limit is per process again and each replica rewrites for itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from alignpro.prompter.cache import MemoryRewriteCache
from alignpro.server.limits import LocalBuckets

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)
T = TypeVar("T")

# A token bucket, atomically: refill by the time passed (Redis's clock, the same for every replica), then take
# ARGV[3] tokens if there are that many (or in any case with ARGV[4] = 1: a charge after the fact). Returns the
# seconds to wait, "0" when granted, as a string (Redis would truncate a Lua number to an integer).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, capacity, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or capacity
local stamp = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if ARGV[4] == '1' or tokens >= cost then
  tokens = tokens - cost
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 60)
return tostring(wait)
"""


class SharedRedis:
    """A Redis client whose calls fall back to local state while Redis does not answer."""

    def __init__(self, url: str, timeout_s: float = 0.25, retry_s: float = 5.0) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries inside redis-py: a dead Redis must cost one timeout, then the local state answers.
        self.client: Redis = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self.url = _redact(url)
        self.retry_s = retry_s
        self.down_since: float | None = None
        self._retry_at = 0.0

    async def run(self, op: Callable[[Redis], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> T:
        """``op`` on Redis, or ``local`` while Redis is away."""
        from redis.exceptions import RedisError

        if self.down_since is not None and time.monotonic() < self._retry_at:
            return await local()
        try:
            result = await op(self.client)
        except (RedisError, OSError) as exc:
            self._went_away(exc)
            return await local()
        if self.down_since is not None:
            log.info(
                "Redis at %s is back after %.0f s: limits and rewrites are shared again",
                self.url,
                time.monotonic() - self.down_since,
            )
            self.down_since = None
        return result

    def _went_away(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning(
                "Redis at %s does not answer (%s: %s): rate limits and the rewrite cache use this process's memory "
                "until it is back (retried every %g s)",
                self.url,
                type(exc).__name__,
                exc,
                self.retry_s,
            )
        self._retry_at = now + self.retry_s

    async def aclose(self) -> None:
        await self.client.aclose()


class RedisBuckets:
    """:class:`~alignpro.server.limits.BucketStore` on Redis, in this process's memory while Redis is away."""

    def __init__(self, shared: SharedRedis) -> None:
        self.shared = shared
        self.local = LocalBuckets()
        self._script = shared.client.register_script(_TAKE)

    async def take(self, key: str, rate: float, capacity: float, cost: float, debt: bool = False) -> float:
        async def remote(_: Redis) -> float:
            args = [repr(rate), repr(capacity), repr(cost), "1" if debt else "0"]
            return float(await self._script(keys=[f"alignpro:bucket:{key}"], args=args))

        return await self.shared.run(remote, lambda: self.local.take(key, rate, capacity, cost, debt))


class RedisRewriteCache:
    """:class:`~alignpro.prompter.cache.RewriteCache` on Redis (entries expire after ``ttl_s``; the memory bound
    is Redis's ``maxmemory`` policy), in this process's memory while Redis is away."""

    def __init__(self, shared: SharedRedis, maxsize: int, ttl_s: float) -> None:
        self.shared = shared
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.local = MemoryRewriteCache(maxsize, ttl_s)

    async def get(self, key: tuple[str, ...]) -> str | None:
        async def remote(r: Redis) -> str | None:
            value: Any = await r.get(_cache_key(key))
            return value.decode("utf-8") if isinstance(value, bytes) else value

        return await self.shared.run(remote, lambda: self.local.get(key))

    async def put(self, key: tuple[str, ...], value: str) -> None:
        async def remote(r: Redis) -> None:
            await r.set(_cache_key(key), value.encode("utf-8", "surrogatepass"), px=self.ttl_ms)

        await self.shared.run(remote, lambda: self.local.put(key, value))


def _cache_key(key: tuple[str, ...]) -> str:
    """One Redis key per cache key: a digest (the prompt text stays out of key listings and has no length limit)."""
    return "alignpro:rewrite:" + hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _redact(url: str) -> str:
    """``url`` without a password (it is logged)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{creds.split(':')[0] + ':***@' if at else ''}{host}"
