"""Prometheus metrics of a model server: requests, latency, batches, in-flight, queue delay, drops.

Per-request counts are kept as plain numbers written by the event loop thread only (no locks:
prometheus_client's Counter/Histogram take a lock per bucket, eleven per Predict), and turned
into metric families when /metrics is scraped.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from meshserve import telemetry
from meshserve.rpc.https import serve_metrics
from meshserve.rpc.tls_files import TlsFiles
from meshserve.servers.batching import BatchObserver

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    """Counts per bucket (`le` semantics, the last one +Inf) and a sum; one writer thread.

    Each bucket also keeps the trace id of its latest observation made inside a trace: an
    OpenMetrics exemplar, so a latency spike on a dashboard leads to one trace that shows it."""

    __slots__ = ("bounds", "counts", "sum", "exemplars")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.exemplars: list[Exemplar | None] = [None] * (len(bounds) + 1)

    def observe(self, value: float, trace_id: str = "") -> None:
        i = bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.sum += value
        if trace_id:
            self.exemplars[i] = Exemplar({"trace_id": trace_id}, value, time.time())

    def buckets(self) -> list[tuple[str, float] | tuple[str, float, Exemplar]]:
        """Cumulative buckets as the exposition wants them, from one snapshot of the counts."""
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        exemplars = list(self.exemplars)
        return [(le, n) if ex is None else (le, n, ex)
                for le, n, ex in zip(les, accumulate(list(self.counts)), exemplars, strict=True)]  # fmt: skip


class ServerMetrics(BatchObserver, Collector):
    """One registry per server (so tests can run several in one process).

    Not thread-safe by design: every method but watch_inflight is called on the event loop."""

    def __init__(self, model: str, version: str) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._label_values = [model, version]
        self._created = time.time()
        self._requests: dict[tuple[str, str], int] = {}
        self._latency: dict[str, _Histogram] = {}
        self._batch_rows = _Histogram(_BATCH_BUCKETS)
        self._batch_requests = _Histogram(_BATCH_BUCKETS)
        self._inference = _Histogram(_LATENCY_BUCKETS)
        self._queue_delay = _Histogram(_LATENCY_BUCKETS)
        self._dropped = 0
        self._deadline_left = _Histogram(_LATENCY_BUCKETS)
        self._inflight = Gauge(
            "meshserve_server_inflight",
            "Requests admitted and not finished (queued + running)",
            ["model", "version"],
            registry=self.registry,
        ).labels(model=model, version=version)
        self.registry.register(self)

    def serve(self, port: int, host: str = "0.0.0.0", tls: TlsFiles | None = None) -> int:
        """Expose /metrics on `port` (0: any free port) from a daemon thread, over mTLS with `tls`; return the
        bound port."""
        return serve_metrics(port, host, self.registry, tls)

    # -- per request -----------------------------------------------------------------------

    def request_done(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        self._requests[key] = self._requests.get(key, 0) + 1
        hist = self._latency.get(method)
        if hist is None:
            hist = self._latency[method] = _Histogram(_LATENCY_BUCKETS)
        hist.observe(seconds, telemetry.trace_id_of())

    # -- BatchObserver ---------------------------------------------------------------------

    def batch_ran(self, size: int, requests: int, seconds: float) -> None:
        self._batch_rows.observe(size)
        self._batch_requests.observe(requests)
        self._inference.observe(seconds)

    def queued(self, seconds: float) -> None:
        self._queue_delay.observe(seconds)

    def dropped_expired(self, count: int) -> None:
        self._dropped += count

    def deadline_seen(self, remaining_s: float) -> None:
        self._deadline_left.observe(remaining_s)

    def watch_inflight(self, count: Callable[[], float]) -> None:
        """Read the in-flight count when scraped (nothing to do per request)."""
        self._inflight.set_function(count)

    # -- Collector: called by the registry when scraped (another thread) --------------------

    def collect(self) -> Iterator[Metric]:
        mv = self._label_values
        requests = CounterMetricFamily(
            "meshserve_server_requests",
            "gRPC requests by method and status code",
            labels=["model", "version", "method", "code"],
        )
        for (method, code), n in list(self._requests.items()):
            requests.add_metric([*mv, method, code], n, created=self._created)
        yield requests
        latency = HistogramMetricFamily(
            "meshserve_server_latency_seconds",
            "Server-side latency of gRPC requests by method",
            labels=["model", "version", "method"],
        )
        for method, hist in list(self._latency.items()):
            latency.add_metric([*mv, method], hist.buckets(), hist.sum)
        yield latency
        for name, doc, hist in (
            ("meshserve_server_batch_size", "Rows per model call after dynamic batching",
             self._batch_rows),
            ("meshserve_server_batch_requests", "Requests merged into one model call",
             self._batch_requests),
            ("meshserve_server_inference_seconds", "Time of one model call (a whole batch)",
             self._inference),
            ("meshserve_server_queue_delay_seconds", "Time a request waited in the batching queue",
             self._queue_delay),
            ("meshserve_server_deadline_remaining_seconds",
             "What was left of the caller's deadline when a request arrived (calls with a deadline)",
             self._deadline_left),
        ):  # fmt: skip
            family = HistogramMetricFamily(name, doc, labels=["model", "version"])
            family.add_metric(mv, hist.buckets(), hist.sum)
            yield family
        dropped = CounterMetricFamily(
            "meshserve_server_dropped_expired",
            "Requests dropped without computing because their deadline expired or they were "
            "cancelled",
            labels=["model", "version"],
        )
        dropped.add_metric(mv, self._dropped, created=self._created)
        yield dropped

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names are only known once collected; the registry need not check
