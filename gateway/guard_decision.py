"""Verdicts of the listing models and the decision they make under the guard's policy."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from meshserve.gateway.flow_policy import CLASSIFIERS, FAIL_CLOSED, GuardPolicy


class Status(enum.Enum):
    """Mirrors meshserve.v1.VerdictStatus."""

    OK = 1
    TIMEOUT = 2
    UNAVAILABLE = 3
    DISABLED = 4
    ERROR = 5


class Decision(enum.IntEnum):
    """Mirrors meshserve.v1.Decision; ordered, so the strictest verdict wins with max()."""

    ALLOW = 1
    REVIEW = 2
    BLOCK = 3


# Statuses that mean "the model should have answered and did not".
MISSING = frozenset({Status.TIMEOUT, Status.UNAVAILABLE, Status.ERROR})


@dataclass(frozen=True)
class Verdict:
    model: str
    status: Status
    version: str = ""
    score: float = 0.0
    review_threshold: float = 0.0
    block_threshold: float = 0.0
    label: str = ""  # the shipping size class, or the detector's best category
    detail: str = ""
    latency_ms: float = 0.0
    cached: bool = False
    arm: str = "stable"  # rollout arm of the version that answered

    @property
    def flagged(self) -> bool:
        """A classifier verdict at or above its review threshold."""
        return self.status is Status.OK and self.model in CLASSIFIERS and self.score >= self.review_threshold


def decide(verdicts: Sequence[Verdict], policy: GuardPolicy) -> tuple[Decision, list[str]]:
    """allow / review / block and one reason per model that moved the decision.

    A classifier at or above its block threshold blocks; at or above its review threshold it
    sends the listing to review. A model that should have answered and did not (timeout,
    unavailable, error) counts only when its policy says fail-closed: then the listing goes to
    review, because nobody judged it — a missing model never blocks on its own.
    """
    decision = Decision.ALLOW
    reasons: list[str] = []
    for v in verdicts:
        if v.status is Status.OK and v.model in CLASSIFIERS:
            if v.score >= v.block_threshold:
                decision = max(decision, Decision.BLOCK)
                reasons.append(f"{v.model} {v.score:.3f} ≥ block {v.block_threshold:g}")
            elif v.score >= v.review_threshold:
                decision = max(decision, Decision.REVIEW)
                reasons.append(f"{v.model} {v.score:.3f} ≥ review {v.review_threshold:g}")
        elif v.status in MISSING and policy.model(v.model).missing == FAIL_CLOSED:
            decision = max(decision, Decision.REVIEW)
            reasons.append(f"{v.model} {v.status.name} (fail-closed)")
    return decision, reasons
