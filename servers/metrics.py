"""Prometheus metrics of a model server: requests, latency, batches, in-flight, queue delay, drops."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from meshserve.servers.batching import BatchObserver

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics(BatchObserver):
    """One registry per server (so tests can run several in one process)."""

    def __init__(self, model: str, version: str) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        labels = {"model": model, "version": version}
        self._requests = Counter(
            "meshserve_server_requests",
            "gRPC requests by method and status code",
            ["model", "version", "method", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "meshserve_server_latency_seconds",
            "Server-side latency of gRPC requests by method",
            ["model", "version", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._batch_rows = Histogram(
            "meshserve_server_batch_size",
            "Rows per model call after dynamic batching",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self._batch_requests = Histogram(
            "meshserve_server_batch_requests",
            "Requests merged into one model call",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self._inference = Histogram(
            "meshserve_server_inference_seconds",
            "Time of one model call (a whole batch)",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self._queue_delay = Histogram(
            "meshserve_server_queue_delay_seconds",
            "Time a request waited in the batching queue",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self._inflight = Gauge(
            "meshserve_server_inflight",
            "Requests admitted and not finished (queued + running)",
            ["model", "version"],
            registry=self.registry,
        ).labels(**labels)
        self._dropped = Counter(
            "meshserve_server_dropped_expired",
            "Requests dropped without computing because their deadline expired or they were "
            "cancelled",
            ["model", "version"],
            registry=self.registry,
        ).labels(**labels)
        self._labels = labels
        self._request_children: dict[tuple[str, str], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose /metrics on `port` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)

    # -- per request (children cached: no label lookups on the hot path) -------------------

    def request_done(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._requests.labels(**self._labels, method=method, code=code)
            self._request_children[key] = counter
        counter.inc()
        hist = self._latency_children.get(method)
        if hist is None:
            hist = self._latency.labels(**self._labels, method=method)
            self._latency_children[method] = hist
        hist.observe(seconds)

    # -- BatchObserver ---------------------------------------------------------------------

    def batch_ran(self, size: int, requests: int, seconds: float) -> None:
        self._batch_rows.observe(size)
        self._batch_requests.observe(requests)
        self._inference.observe(seconds)

    def queued(self, seconds: float) -> None:
        self._queue_delay.observe(seconds)

    def dropped_expired(self, count: int) -> None:
        self._dropped.inc(count)

    def watch_inflight(self, count: Callable[[], float]) -> None:
        """Read the in-flight count when scraped (nothing to do per request)."""
        self._inflight.set_function(count)
