"""Tracing for every meshserve process: OTel setup from OTEL_* env and W3C context over gRPC metadata.

Exporter choice (first that applies):
  - `OTEL_SDK_DISABLED=true` → no tracing at all;
  - `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) → OTLP over gRPC;
  - a JSON-lines file (`--trace-file` / `MESHSERVE_TRACE_FILE`) → one finished span per line;
  - otherwise no exporter: spans are not recorded, but the caller's trace id still flows
    through (logs can name it, downstream calls carry it).
`OTEL_SERVICE_NAME` names the service (default: what the process passes in).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACE_FILE_ENV = "MESHSERVE_TRACE_FILE"
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_KEYS = frozenset(("traceparent", "tracestate"))


@dataclass(frozen=True)
class TracingConfig:
    """Where spans go. Build with `from_env()`; a flag may override the file path."""

    service_name: str
    otlp_endpoint: str | None = None
    trace_file: Path | None = None
    disabled: bool = False

    @classmethod
    def from_env(cls, default_service: str, trace_file: str | Path | None = None) -> TracingConfig:
        env = os.environ
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        path = trace_file or env.get(TRACE_FILE_ENV)
        return cls(
            service_name=env.get("OTEL_SERVICE_NAME") or default_service,
            otlp_endpoint=endpoint or None,
            trace_file=Path(path) if path else None,
            disabled=env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true",
        )

    @property
    def exporting(self) -> bool:
        return not self.disabled and bool(self.otlp_endpoint or self.trace_file)


class JsonLinesSpanExporter:
    """Writes each finished span as one JSON object per line (trace_id, span_id, parent …)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown()
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = [json.dumps(span_record(s), separators=(",", ":")) + "\n" for s in spans]
        with self._lock:
            if self._file.closed:
                return SpanExportResult.FAILURE
            self._file.writelines(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_record(span: Any) -> dict[str, Any]:
    """A finished SDK span as a plain dict (the JSON-lines format)."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
    }


_provider: Any = None


def setup_tracing(config: TracingConfig) -> bool:
    """Install the global tracer provider once; True when spans are exported somewhere."""
    global _provider
    if _provider is not None or not config.exporting:
        return _provider is not None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    exporter: Any
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_* itself
        where = config.otlp_endpoint
    else:
        assert config.trace_file is not None
        exporter = JsonLinesSpanExporter(config.trace_file)
        where = str(config.trace_file)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing %s → %s", config.service_name, where)
    return True


def exporting() -> bool:
    """True while setup_tracing() has a provider installed (spans are worth recording)."""
    return _provider is not None


def shutdown_tracing() -> None:
    """Flush and stop the exporter (call before the process exits)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


# -- W3C trace context over gRPC metadata -------------------------------------------------


def extract_context(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    """The caller's trace context from incoming gRPC metadata (empty context when absent)."""
    carrier: dict[str, str] = {}
    if metadata:
        for key, value in metadata:
            if key in _TRACE_KEYS:
                carrier[key] = value if isinstance(value, str) else value.decode("ascii", "replace")
    if not carrier:
        return otel_context.Context()
    return _PROPAGATOR.extract(carrier)


def inject_metadata(
    metadata: Sequence[tuple[str, str]] = (), ctx: otel_context.Context | None = None
) -> list[tuple[str, str]]:
    """Outgoing gRPC metadata: `metadata` plus traceparent/tracestate of `ctx` (default current)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    out = [kv for kv in metadata if kv[0] not in _TRACE_KEYS]
    out.extend(carrier.items())
    return out


def trace_id_of(ctx: otel_context.Context | None = None) -> str:
    """Hex trace id of the current (or given) context's span, '' when there is none."""
    span_ctx = trace.get_current_span(ctx).get_span_context()
    return format(span_ctx.trace_id, "032x") if span_ctx.trace_id else ""
