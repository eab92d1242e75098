"""A bounded, time-limited cache (LRU + TTL) for one event loop: search results and catalogue rows."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

CACHE_LOOKUPS = Counter("meshserve_gateway_cache_lookups_total", "Cache lookups", ["cache", "result"])
CACHE_ENTRIES = Gauge("meshserve_gateway_cache_entries", "Entries held by a cache", ["cache"])
CACHE_BYTES = Gauge("meshserve_gateway_cache_bytes", "Estimated bytes held by a cache (keys and values)",
                    ["cache"])  # fmt: skip


class TTLCache(Generic[K, V]):
    """At most `max_entries` values and `max_bytes` estimated bytes (`size_of(key, value)` per
    entry), each forgotten `ttl_s` after it was stored. An entry bigger than `max_bytes` on its
    own is not kept."""

    def __init__(self, name: str, max_entries: int, ttl_s: float, max_bytes: int | None = None,
                 size_of: Callable[[K, V], int] | None = None):  # fmt: skip
        if max_entries < 0 or ttl_s < 0 or (max_bytes is not None and max_bytes < 0):
            raise ValueError("cache size, byte budget and TTL must be ≥ 0")
        if max_bytes is not None and size_of is None:
            raise ValueError("a byte budget needs size_of")
        self.name = name
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._size_of = size_of
        self._items: OrderedDict[K, tuple[float, V, int]] = OrderedDict()
        self.bytes = 0
        self._hits = CACHE_LOOKUPS.labels(name, "hit")
        self._misses = CACHE_LOOKUPS.labels(name, "miss")
        self._entries_gauge = CACHE_ENTRIES.labels(name)
        self._bytes_gauge = CACHE_BYTES.labels(name)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        entry = self._items.get(key)
        if entry is None or entry[0] < time.monotonic():
            if entry is not None:
                self._drop(key)
                self._report()
            self._misses.inc()
            return None
        self._items.move_to_end(key)
        self._hits.inc()
        return entry[1]

    def put(self, key: K, value: V) -> None:
        if self.max_entries == 0 or self.ttl_s == 0:
            return
        size = self._size_of(key, value) if self._size_of is not None else 0
        if key in self._items:
            self._drop(key)
        if self.max_bytes is not None and size > self.max_bytes:
            self._report()
            return
        self._items[key] = (time.monotonic() + self.ttl_s, value, size)
        self.bytes += size
        while len(self._items) > self.max_entries or (self.max_bytes is not None and self.bytes > self.max_bytes):
            self._drop(next(iter(self._items)))
        self._report()

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
        self._report()

    def _drop(self, key: K) -> None:
        self.bytes -= self._items.pop(key)[2]

    def _report(self) -> None:
        self._entries_gauge.set(len(self._items))
        self._bytes_gauge.set(self.bytes)
