"""How the gateway calls each service, declared as data: retries, budget, hedging, ejection."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class CallPolicy:
    """One service's calling policy. `status` prints it; nothing else decides how calls repeat."""

    service: str
    # Retry on another replica for these codes, while the deadline and the budget allow.
    retry_on: frozenset[grpc.StatusCode] = RETRYABLE
    max_attempts: int = 3
    # Retries may add at most this fraction of the calls as extra load (plus a small floor
    # so a quiet gateway can still retry at all).
    retry_budget_ratio: float = 0.1
    retry_budget_floor_per_s: float = 5.0
    # Send a second copy to another replica when the first has not answered after this long.
    hedge_after_ms: float | None = None
    # Outlier ejection: this many consecutive failures eject a replica for base × 2^(n-1)
    # seconds (n = how often it was ejected in a row), at most max; never more than this
    # fraction of a set at once.
    eject_after_failures: int = 3
    base_ejection_s: float = 1.0
    max_ejection_s: float = 30.0
    max_ejected_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"{self.service}: max_attempts must be ≥ 1")
        if not 0 <= self.retry_budget_ratio <= 1:
            raise ValueError(f"{self.service}: retry_budget_ratio must be in [0, 1]")
        if self.hedge_after_ms is not None and self.hedge_after_ms <= 0:
            raise ValueError(f"{self.service}: hedge_after_ms must be positive")
        if self.eject_after_failures < 1 or not 0 < self.base_ejection_s <= self.max_ejection_s:
            raise ValueError(f"{self.service}: ejection settings are inconsistent")

    def ejection_s(self, times_ejected: int) -> float:
        return min(self.max_ejection_s, self.base_ejection_s * 2 ** max(0, times_ejected - 1))

    def describe(self) -> dict[str, object]:
        return {
            "retry_on": sorted(code.name for code in self.retry_on),
            "max_attempts": self.max_attempts,
            "retry_budget": f"{self.retry_budget_ratio:.0%} + {self.retry_budget_floor_per_s:g}/s",
            "hedge_after_ms": self.hedge_after_ms,
            "eject_after_failures": self.eject_after_failures,
            "ejection_s": f"{self.base_ejection_s:g}..{self.max_ejection_s:g}",
        }


@dataclass
class RetryBudget:
    """A token bucket filled by calls: each call adds `ratio` tokens, each retry or hedge takes one.

    The floor adds tokens with time so a lightly used service can still retry. The bucket is
    capped so a long quiet spell does not save up a retry storm.
    """

    ratio: float
    floor_per_s: float
    cap: float = 20.0
    tokens: float = field(default=10.0)
    stamp: float = field(default_factory=lambda: time.monotonic())  # (looked up per call: tests move the clock)

    def on_call(self) -> None:
        self._refill()
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.cap, self.tokens + (now - self.stamp) * self.floor_per_s)
        self.stamp = now

    @classmethod
    def for_policy(cls, policy: CallPolicy) -> RetryBudget:
        return cls(ratio=policy.retry_budget_ratio, floor_per_s=policy.retry_budget_floor_per_s)


HEDGE_META = "hedge_ms"  # registry meta: a gateway hedges detector/embedder calls after this many ms (absent: off)
HEDGE_SHARDS_META = "hedge_shards_ms"  # registry meta: a gateway hedges shard calls after this many ms (absent: off)


def default_policies(hedge_ms: float | None = None, hedge_shards_ms: float | None = None) -> dict[str, CallPolicy]:
    """The gateway's declared policies. Detector and embedder may hedge after `hedge_ms`; a shard
    call after `hedge_shards_ms`, its own setting: only the slow calls of a fan-out are hedged, and
    their shards are asked of other processes (gateway/shard_fanout.py)."""
    from meshserve.registry.config import SERVICE_NAMES

    return {
        "detector": CallPolicy(SERVICE_NAMES["detector"], hedge_after_ms=hedge_ms),
        "embedder": CallPolicy(SERVICE_NAMES["embedder"], hedge_after_ms=hedge_ms),
        "indexer": CallPolicy(SERVICE_NAMES["indexer"], hedge_after_ms=hedge_shards_ms),
        "classifier": CallPolicy(SERVICE_NAMES["classifier"], max_attempts=2),
        "shipping": CallPolicy(SERVICE_NAMES["shipping"]),
    }
