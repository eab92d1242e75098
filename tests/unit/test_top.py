"""`meshserve top`'s figures: quantiles like PromQL's histogram_quantile, rates from the previous frame."""

from __future__ import annotations

import math

import pytest

from meshserve.local.top import Frame, Replica, Scrape, parse_samples, quantile, render, replica_from_entry


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile() -> None:
    cumulative = {0.1: 0.0, 0.5: 50.0, 1.0: 100.0, math.inf: 100.0}
    assert quantile(0.5, cumulative) == pytest.approx(0.5)
    assert quantile(0.99, cumulative) == pytest.approx(0.5 + 0.5 * 49 / 50)
    assert quantile(0.25, cumulative) == pytest.approx(0.1 + 0.4 * 25 / 50)
    assert quantile(0.99, {1.0: 0.0, math.inf: 10.0}) == 1.0  # all above the last finite bound
    assert math.isnan(quantile(0.5, {1.0: 0.0, math.inf: 0.0}))


def server_metrics(ok: int, failed: int, fast: int) -> str:
    """An exposition like a model server's: `ok` + `failed` Predicts, `fast` of them under 10 ms."""
    return f"""# TYPE meshserve_server_requests counter
meshserve_server_requests_total{{model="m",version="1",method="Predict",code="OK"}} {ok}
meshserve_server_requests_total{{model="m",version="1",method="Predict",code="UNAVAILABLE"}} {failed}
# TYPE meshserve_server_latency_seconds histogram
meshserve_server_latency_seconds_bucket{{model="m",version="1",method="Predict",le="0.01"}} {fast}
meshserve_server_latency_seconds_bucket{{model="m",version="1",method="Predict",le="0.1"}} {ok + failed}
meshserve_server_latency_seconds_bucket{{model="m",version="1",method="Predict",le="+Inf"}} {ok + failed}
meshserve_server_latency_seconds_sum{{model="m",version="1",method="Predict"}} 1.0
meshserve_server_latency_seconds_count{{model="m",version="1",method="Predict"}} {ok + failed}
"""


def test_frames_show_totals_first_then_rates_and_quantiles_of_the_interval() -> None:
    entry = {"Node": {"Address": "10.0.0.1"},
             "Service": {"ID": "meshserve-embedder-10.0.0.2-5000", "Service": "meshserve-embedder",
                         "Address": "10.0.0.2", "Port": 5000, "Meta": {"version": "7", "model": "m",
                                                                       "metrics_port": "9464"}},
             "Checks": [{"Status": "passing"}, {"Status": "passing"}]}  # fmt: skip
    replica = replica_from_entry(entry)
    assert replica == Replica("meshserve-embedder", "meshserve-embedder-10.0.0.2-5000", "10.0.0.2:5000", "passing",
                              "7", "m", "10.0.0.2:9464")  # fmt: skip
    sick = replica_from_entry({**entry, "Checks": [{"Status": "passing"}, {"Status": "critical"}]})
    assert sick.health == "critical"

    first = Frame(100.0, [Scrape(replica, parse_samples(server_metrics(ok=10, failed=0, fast=10)))])
    screen = render(first, None, "http://consul:8500")
    row = next(line.split() for line in screen.splitlines() if line.startswith("meshserve-embedder "))
    assert row[:5] == ["meshserve-embedder", "1/1", "7", "10", "tot"]

    # 2 s later: 20 more Predicts (4 failed), all of them slower than 10 ms
    second = Frame(102.0, [Scrape(replica, parse_samples(server_metrics(ok=26, failed=4, fast=10)))])
    screen = render(second, first, "http://consul:8500")
    row = next(line.split() for line in screen.splitlines() if line.startswith("meshserve-embedder "))
    assert row[:5] == ["meshserve-embedder", "1/1", "7", "10.0", "2.0"]  # req/s, err/s
    assert float(row[5]) == pytest.approx(55.0) and float(row[6]) == pytest.approx(99.1)  # p50, p99 in ms
    assert "(no gateway metrics)" in screen


def test_an_indexer_registered_once_per_shard_counts_once_in_its_service_row() -> None:
    def shard(name: str) -> Replica:
        return Replica("meshserve-indexer", f"meshserve-indexer-10.0.0.3-5000-{name}", "10.0.0.3:5000", "passing",
                       "7.g1", "catalogue", "10.0.0.3:9465")  # fmt: skip

    samples = parse_samples(server_metrics(ok=10, failed=0, fast=10))
    first = Frame(100.0, [Scrape(shard("base-0"), samples), Scrape(shard("base-1"), samples)])
    later = parse_samples(server_metrics(ok=30, failed=0, fast=30))
    second = Frame(102.0, [Scrape(shard("base-0"), later), Scrape(shard("base-1"), later)])
    screen = render(second, first, "c")
    row = next(line.split() for line in screen.splitlines() if line.startswith("meshserve-indexer "))
    assert row[:4] == ["meshserve-indexer", "2/2", "7.g1", "10.0"]  # 20 Predicts in 2 s, not 40
