"""The guard's verdict cache: (listing content hash, model, model version, policy version) → verdict,
bounded by entries and by bytes, least recently used out first."""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from meshserve.gateway.guard_decision import Verdict

VERDICT_LOOKUPS = Counter("meshserve_gateway_verdict_cache_lookups_total", "Verdict cache lookups", ["result"])
VERDICT_BYTES = Gauge("meshserve_gateway_verdict_cache_bytes", "Approximate bytes the verdict cache holds")


@dataclass(frozen=True)
class VerdictKey:
    """Everything a verdict depends on: a new model version or policy version is another key."""

    listing: str  # sha256 of the listing's content
    model: str
    model_version: str
    policy_version: str


def _size(key: VerdictKey, verdict: Verdict) -> int:
    text = (key.listing, key.model, key.model_version, key.policy_version, verdict.model,
            verdict.version, verdict.label, verdict.detail)  # fmt: skip
    return 256 + sum(sys.getsizeof(t) for t in text)


class VerdictCache:
    def __init__(self, max_entries: int = 50_000, max_bytes: int = 32 * 1024 * 1024, ttl_s: float = 600.0):
        if max_entries < 0 or max_bytes < 0 or ttl_s < 0:
            raise ValueError("verdict cache entries, bytes and TTL must be ≥ 0")
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self._items: OrderedDict[VerdictKey, tuple[float, int, Verdict]] = OrderedDict()
        self.bytes = 0
        self._hits = VERDICT_LOOKUPS.labels("hit")
        self._misses = VERDICT_LOOKUPS.labels("miss")

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: VerdictKey) -> Verdict | None:
        entry = self._items.get(key)
        if entry is None or entry[0] < time.monotonic():
            if entry is not None:
                self._drop(key)
            self._misses.inc()
            return None
        self._items.move_to_end(key)
        self._hits.inc()
        return entry[2]

    def put(self, key: VerdictKey, verdict: Verdict) -> None:
        size = _size(key, verdict)
        if self.max_entries == 0 or self.ttl_s == 0 or size > self.max_bytes:
            return
        if key in self._items:
            self._drop(key)
        self._items[key] = (time.monotonic() + self.ttl_s, size, verdict)
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))
        VERDICT_BYTES.set(self.bytes)

    def _drop(self, key: VerdictKey) -> None:
        _, size, _ = self._items.pop(key)
        self.bytes -= size
        VERDICT_BYTES.set(self.bytes)
