"""The guard's verdict cache: (listing content hash, model, model version, policy version) → verdict,
a TTLCache bounded by entries and by bytes, least recently used out first."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from meshserve.gateway.cache import TTLCache
from meshserve.gateway.guard_decision import Verdict


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


class VerdictCache(TTLCache[VerdictKey, Verdict]):
    def __init__(self, max_entries: int = 50_000, max_bytes: int = 32 * 1024 * 1024, ttl_s: float = 600.0):
        super().__init__("verdicts", max_entries, ttl_s, max_bytes, _size)
