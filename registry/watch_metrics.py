"""Prometheus metrics of registry watches: staleness, errors, changes, instance counts."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Counter, Gauge


class _Watched(Protocol):
    @property
    def staleness_s(self) -> float: ...

    @property
    def stale(self) -> bool: ...

    @property
    def size(self) -> int: ...


WATCH_STALE = Gauge(
    "meshserve_registry_watch_stale",
    "1 while a watch serves its last known result because Consul does not answer",
    ["kind", "target"],
)
WATCH_STALENESS = Gauge(
    "meshserve_registry_watch_staleness_seconds",
    "Seconds since a stale watch last heard from Consul (0 while it is fresh)",
    ["kind", "target"],
)
WATCH_SIZE = Gauge(
    "meshserve_registry_watch_size",
    "Passing instances (service watch) or keys (KV watch) in the last known result",
    ["kind", "target"],
)
WATCH_ERRORS = Counter(
    "meshserve_registry_watch_errors_total",
    "Failed blocking queries (unreachable agent, timeouts, 5xx)",
    ["kind", "target"],
)
WATCH_CHANGES = Counter(
    "meshserve_registry_watch_changes_total",
    "Times a watch's result changed",
    ["kind", "target"],
)

# Several watches may follow the same target (one per gateway flow); the gauges report
# the worst of the live ones, computed at scrape time so staleness keeps growing.
_live: dict[tuple[str, str], weakref.WeakSet[_Watched]] = {}
_lock = threading.Lock()


def track(kind: str, target: str, watch: _Watched) -> None:
    """Count `watch` in the gauges of (kind, target) for as long as it lives."""
    key = (kind, target)
    with _lock:
        if key not in _live:
            watches: weakref.WeakSet[_Watched] = weakref.WeakSet()
            _live[key] = watches
            WATCH_STALE.labels(kind, target).set_function(_worst(watches, lambda w: w.stale))
            WATCH_STALENESS.labels(kind, target).set_function(
                _worst(watches, lambda w: w.staleness_s)
            )
            WATCH_SIZE.labels(kind, target).set_function(_worst(watches, lambda w: w.size))
        _live[key].add(watch)


def untrack(kind: str, target: str, watch: _Watched) -> None:
    with _lock:
        watches = _live.get((kind, target))
        if watches is not None:
            watches.discard(watch)


def _worst(
    watches: weakref.WeakSet[_Watched], measure: Callable[[_Watched], float]
) -> Callable[[], float]:
    def value() -> float:
        with _lock:
            members = list(watches)
        return max((float(measure(w)) for w in members), default=0.0)

    return value
