"""A bounded, time-limited cache (LRU + TTL) for one event loop: predictions and catalogue rows."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from prometheus_client import Counter

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

CACHE_LOOKUPS = Counter("meshserve_gateway_cache_lookups_total", "Cache lookups", ["cache", "result"])


class TTLCache(Generic[K, V]):
    """At most `max_entries` values, each forgotten `ttl_s` after it was stored."""

    def __init__(self, name: str, max_entries: int, ttl_s: float):
        if max_entries < 0 or ttl_s < 0:
            raise ValueError("cache size and TTL must be ≥ 0")
        self.name = name
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._hits = CACHE_LOOKUPS.labels(name, "hit")
        self._misses = CACHE_LOOKUPS.labels(name, "miss")

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        entry = self._items.get(key)
        if entry is None or entry[0] < time.monotonic():
            if entry is not None:
                del self._items[key]
            self._misses.inc()
            return None
        self._items.move_to_end(key)
        self._hits.inc()
        return entry[1]

    def put(self, key: K, value: V) -> None:
        if self.max_entries == 0 or self.ttl_s == 0:
            return
        self._items[key] = (time.monotonic() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
