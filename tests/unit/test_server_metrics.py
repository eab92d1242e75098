"""ServerMetrics: plain per-request counts exposed as Prometheus counters and histograms."""

from __future__ import annotations

from meshserve.servers.metrics import ServerMetrics

LABELS = {"model": "m", "version": "1"}


def test_counts_become_counters_and_cumulative_histograms_when_scraped() -> None:
    metrics = ServerMetrics("m", "1")
    metrics.watch_inflight(lambda: 2)
    for seconds in (0.0003, 0.0007, 0.02, 30.0):
        metrics.request_done("Predict", "OK", seconds)
    metrics.request_done("Predict", "INVALID_ARGUMENT", 0.0001)
    metrics.batch_ran(4, 2, 0.001)
    metrics.queued(0.0)
    metrics.dropped_expired(3)
    value = metrics.registry.get_sample_value
    predict = {**LABELS, "method": "Predict"}
    assert value("meshserve_server_requests_total", {**predict, "code": "OK"}) == 4
    assert value("meshserve_server_requests_total", {**predict, "code": "INVALID_ARGUMENT"}) == 1
    assert value("meshserve_server_latency_seconds_bucket", {**predict, "le": "0.0005"}) == 2
    assert value("meshserve_server_latency_seconds_bucket", {**predict, "le": "0.001"}) == 3
    assert value("meshserve_server_latency_seconds_bucket", {**predict, "le": "10.0"}) == 4
    assert value("meshserve_server_latency_seconds_bucket", {**predict, "le": "+Inf"}) == 5
    assert value("meshserve_server_latency_seconds_count", predict) == 5
    assert abs(value("meshserve_server_latency_seconds_sum", predict) - 30.0211) < 1e-9
    assert value("meshserve_server_batch_size_bucket", {**LABELS, "le": "2.0"}) == 0
    assert value("meshserve_server_batch_size_bucket", {**LABELS, "le": "4.0"}) == 1  # le: 4 <= 4
    assert value("meshserve_server_batch_requests_sum", LABELS) == 2
    assert value("meshserve_server_inference_seconds_count", LABELS) == 1
    assert value("meshserve_server_queue_delay_seconds_bucket", {**LABELS, "le": "0.0005"}) == 1
    assert value("meshserve_server_dropped_expired_total", LABELS) == 3
    assert value("meshserve_server_inflight", LABELS) == 2
