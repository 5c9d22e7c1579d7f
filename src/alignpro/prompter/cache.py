"""The rewrite cache: a bounded LRU with a TTL in this process (:class:`MemoryRewriteCache`), or Redis shared by
every gateway replica (:class:`alignpro.server.shared.RedisRewriteCache`).

Keyed (:func:`rewrite_key`) by the caller's scope, the prompter's identity (engine, model or adapter and its
fingerprint, contract, mode) and the exact request text, so a new prompter version never serves an old rewrite, and one tenant's
requests never make another's fast: a hit is a timing side channel that tells whether the same text was asked
before. A cached rewrite is one sample x' ~ rho(.|x) reused for repeats of the same x: this trades sample
diversity for latency, which is the point of the cache.

Bounded by entries and by bytes (the UTF-8 size of keys and values): 4,096 entries of 1 MiB prompts would
otherwise be 4 GiB.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

V = TypeVar("V")


def rewrite_key(
    scope: str, prompter: str, fingerprint: str, mode: str, contract: str, context: str, text: str
) -> tuple[str, ...]:
    """The cache key of a rewrite: ``scope`` (the caller: an API key's id or tenant) first, so no entry is shared
    across callers, in this cache or the shared one (Redis), which both use this key."""
    return (scope, prompter, fingerprint, mode, contract, context, text)


def _size(key: tuple[str, ...], value: object) -> int:
    return sum(len(k.encode("utf-8", "surrogatepass")) for k in key) + len(
        str(value).encode("utf-8", "surrogatepass")
    )


class TTLCache(Generic[V]):
    def __init__(
        self,
        maxsize: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int | None = None,
    ) -> None:
        self.maxsize = maxsize
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[tuple[str, ...], tuple[float, V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, key: tuple[str, ...]) -> None:
        self.nbytes -= self._items.pop(key)[2]

    def get(self, key: tuple[str, ...]) -> V | None:
        item = self._items.get(key)
        if item is None or item[0] < self.clock():
            if item is not None:
                self._drop(key)
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: tuple[str, ...], value: V) -> None:
        size = _size(key, value)
        if self.maxsize <= 0 or (self.max_bytes is not None and size > self.max_bytes):
            return  # an entry larger than the whole budget is not cached at all
        if key in self._items:
            self._drop(key)
        self._items[key] = (self.clock() + self.ttl_s, value, size)
        self.nbytes += size
        while len(self._items) > self.maxsize or (
            self.max_bytes is not None and self.nbytes > self.max_bytes
        ):
            self._drop(next(iter(self._items)))


class RewriteCache(Protocol):
    """Where the prompter stage keeps rewrites; a miss is ``None``."""

    async def get(self, key: tuple[str, ...]) -> str | None: ...

    async def put(self, key: tuple[str, ...], value: str) -> None: ...


class MemoryRewriteCache:
    """Rewrites in this process's memory (the default)."""

    def __init__(self, maxsize: int, ttl_s: float, max_bytes: int | None = None) -> None:
        self.items: TTLCache[str] = TTLCache(maxsize, ttl_s, max_bytes=max_bytes)

    async def get(self, key: tuple[str, ...]) -> str | None:
        return self.items.get(key)

    async def put(self, key: tuple[str, ...], value: str) -> None:
        self.items.put(key, value)
