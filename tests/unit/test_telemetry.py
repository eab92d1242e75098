"""W3C trace context over gRPC metadata, and the tracing config from OTEL_* env."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from meshserve import telemetry

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


def test_inject_then_extract_carries_the_trace() -> None:
    span = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, True, TraceFlags(1)))
    ctx = trace.set_span_in_context(span)
    metadata = telemetry.inject_metadata([("x-user", "u1"), ("traceparent", "stale")], ctx)
    assert ("x-user", "u1") in metadata
    assert [v for k, v in metadata if k == "traceparent"] == [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ]
    back = telemetry.extract_context(tuple(metadata))
    assert telemetry.trace_id_of(back) == format(TRACE_ID, "032x")
    assert trace.get_current_span(back).get_span_context().span_id == SPAN_ID


def test_extract_without_or_with_bad_headers_gives_an_empty_context() -> None:
    assert telemetry.trace_id_of(telemetry.extract_context(None)) == ""
    assert telemetry.trace_id_of(telemetry.extract_context([("traceparent", "garbage")])) == ""


def test_config_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED", telemetry.TRACE_FILE_ENV):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    assert not telemetry.TracingConfig.from_env("svc").exporting
    monkeypatch.setenv(telemetry.TRACE_FILE_ENV, str(tmp_path / "t.jsonl"))
    monkeypatch.setenv("OTEL_SERVICE_NAME", "named")
    cfg = telemetry.TracingConfig.from_env("svc")
    assert cfg.exporting and cfg.service_name == "named" and cfg.trace_file == tmp_path / "t.jsonl"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert telemetry.TracingConfig.from_env("svc").otlp_endpoint == "http://127.0.0.1:4317"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not telemetry.TracingConfig.from_env("svc").exporting
