"""Shadow traffic: a copy of a request sent to a candidate version after the caller has its answer,
compared with the stable answer and recorded; never returned, never waited for, dropped under load."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from meshserve.gateway.model_wire import Detected

log = logging.getLogger(__name__)

SHADOW_CALLS = Counter("meshserve_gateway_shadow_requests_total",
                       "Shadow calls to a candidate version by outcome (compared, failed, dropped)",
                       ["service", "version", "outcome"])
AGREEMENT = Histogram("meshserve_gateway_shadow_agreement",
                      "Agreement of a candidate's shadow answer with the stable one, in [0, 1] (measure "
                      "`agreement` is what rollout analysis reads)", ["service", "version", "measure"],
                      buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0))
SHADOW_LATENCY = Histogram("meshserve_gateway_shadow_latency_seconds", "Shadow call latency",
                           ["service", "version"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))

# What a comparison returns: measure → value in [0, 1]; "agreement" is the headline one.
Comparison = dict[str, float]


@dataclass(frozen=True)
class ShadowConfig:
    max_in_flight: int = 32  # more waiting shadows than this: new ones are dropped
    budget_s: float = 2.0  # each shadow's own deadline, independent of the caller's


class ShadowRunner:
    """Runs shadow comparisons in the background, bounded in number and time."""

    def __init__(self, config: ShadowConfig | None = None):
        self.config = config or ShadowConfig()
        self._running: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def submit(self, service: str, version: str, compare: Callable[[float], Awaitable[Comparison]]) -> bool:
        """Start `compare(deadline)` unless too many shadows wait already; never raises."""
        if len(self._running) >= self.config.max_in_flight:
            SHADOW_CALLS.labels(service, version, "dropped").inc()
            return False
        task = asyncio.get_running_loop().create_task(self._run(service, version, compare))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return True

    async def _run(self, service: str, version: str, compare: Callable[[float], Awaitable[Comparison]]) -> None:
        started = time.monotonic()
        try:
            measures = await asyncio.wait_for(compare(started + self.config.budget_s), self.config.budget_s)
        except Exception as exc:  # a shadow's failure is data, never the caller's problem
            SHADOW_CALLS.labels(service, version, "failed").inc()
            log.debug("shadow %s@%s failed: %s", service, version, exc)
            return
        SHADOW_CALLS.labels(service, version, "compared").inc()
        SHADOW_LATENCY.labels(service, version).observe(time.monotonic() - started)
        for measure, value in measures.items():
            AGREEMENT.labels(service, version, measure).observe(value)

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def compare_detections(stable: Sequence[Detected], candidate: Sequence[Detected]) -> Comparison:
    """Same top-1 label (the headline agreement) and the IoU of the two top-1 boxes."""
    if not stable or not candidate:
        same = 1.0 if not stable and not candidate else 0.0
        return {"agreement": same, "top1_label": same, "iou": same}
    a, b = max(stable, key=lambda d: d.score), max(candidate, key=lambda d: d.score)
    same = 1.0 if a.label == b.label else 0.0
    return {"agreement": same, "top1_label": same, "iou": _iou(a.box, b.box)}


def compare_labels(stable: Sequence[str], candidate: Sequence[str]) -> Comparison:
    """Top-1 label agreement of two ranked label lists (the guard's category suggestions)."""
    same = 1.0 if (stable[:1] == candidate[:1]) else 0.0
    return {"agreement": same, "top1_label": same}


def compare_matches(stable: Sequence[Sequence[str]], candidate: Sequence[Sequence[str]], k: int = 10) -> Comparison:
    """Mean top-k overlap of the item ids per detection (both lists per detection, best first)."""
    if not stable:
        return {"agreement": 1.0, "top10_overlap": 1.0}
    overlaps = []
    for a, b in zip(stable, candidate, strict=False):
        want = set(a[:k])
        overlaps.append(len(want & set(b[:k])) / len(want) if want else 1.0)
    overlaps += [0.0] * (len(stable) - len(overlaps))
    mean = sum(overlaps) / len(overlaps)
    return {"agreement": mean, "top10_overlap": mean}


def compare_scores(stable: float, candidate: float) -> Comparison:
    """A classifier's two scores: agreement is 1 − |difference| (scores are probabilities)."""
    diff = abs(stable - candidate)
    return {"agreement": max(0.0, 1.0 - diff), "score_diff": min(diff, 1.0)}
