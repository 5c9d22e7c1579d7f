"""The rewrite cache: a bounded LRU with a TTL in this process (:class:`MemoryRewriteCache`), or Redis shared by
every gateway replica (:class:`alignpro.server.shared.RedisRewriteCache`).

Keyed by the prompter's identity (engine, model or adapter and its fingerprint, contract, mode) and the exact
request text, so a new prompter version never serves an old rewrite. A cached rewrite is one sample
x' ~ rho(.|x) reused for repeats of the same x: this trades sample diversity for latency, which is the point of
the cache.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

V = TypeVar("V")


class TTLCache(Generic[V]):
    def __init__(self, maxsize: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.maxsize = maxsize
        self.ttl_s = ttl_s
        self.clock = clock
        self._items: OrderedDict[tuple[str, ...], tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[str, ...]) -> V | None:
        item = self._items.get(key)
        if item is None or item[0] < self.clock():
            if item is not None:
                del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: tuple[str, ...], value: V) -> None:
        if self.maxsize <= 0:
            return
        self._items[key] = (self.clock() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)


class RewriteCache(Protocol):
    """Where the prompter stage keeps rewrites; a miss is ``None``."""

    async def get(self, key: tuple[str, ...]) -> str | None: ...

    async def put(self, key: tuple[str, ...], value: str) -> None: ...


class MemoryRewriteCache:
    """Rewrites in this process's memory (the default)."""

    def __init__(self, maxsize: int, ttl_s: float) -> None:
        self.items: TTLCache[str] = TTLCache(maxsize, ttl_s)

    async def get(self, key: tuple[str, ...]) -> str | None:
        return self.items.get(key)

    async def put(self, key: tuple[str, ...], value: str) -> None:
        self.items.put(key, value)
