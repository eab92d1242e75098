"""Latency histograms carry the trace id of a request as an OpenMetrics exemplar (text format: none)."""

from __future__ import annotations

import re

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from meshserve.servers.metrics import ServerMetrics

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736


def test_a_request_inside_a_trace_leaves_its_trace_id_on_its_latency_bucket() -> None:
    metrics = ServerMetrics("m", "1")
    metrics.request_done("Predict", "OK", 0.02)  # outside any trace: a count, no exemplar
    parent = SpanContext(TRACE_ID, 0x00F067AA0BA902B7, is_remote=True, trace_flags=TraceFlags(1))
    with trace.use_span(NonRecordingSpan(parent)):
        metrics.request_done("Predict", "OK", 0.2)
    text = generate_openmetrics(metrics.registry).decode()
    exemplars = re.findall(r'^meshserve_server_latency_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} \S+ '
                           r'# \{trace_id="(\w+)"\} (\S+)', text, re.M)  # fmt: skip
    assert exemplars == [("0.25", format(TRACE_ID, "032x"), "0.2")]
    assert "# {" not in generate_latest(metrics.registry).decode()  # the classic text format has none
