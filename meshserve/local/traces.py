"""One trace's spans for `meshserve trace`: from the JSON-lines trace file, or from Jaeger's query API.

Either way the spans come out as the trace file's records (name, trace_id, span_id,
parent_span_id, service, start_ns, end_ns), which `waterfall()` in demo.py draws.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

QUERY_ENV = "MESHSERVE_TRACE_QUERY"  # e.g. http://jaeger:16686 (the query service, not the collector)
MAX_TRACE_BYTES = 64 * 1024 * 1024


def from_file(path: Path, trace_id: str) -> list[dict[str, Any]]:
    from meshserve.local.demo import read_trace

    return read_trace(path, trace_id, settle_s=1.0)


def from_jaeger(query_url: str, trace_id: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """GET <query_url>/api/traces/<trace_id>; [] when Jaeger does not know the trace."""
    url = f"{query_url.rstrip('/')}/api/traces/{trace_id}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            document = json.loads(resp.read(MAX_TRACE_BYTES + 1)[:MAX_TRACE_BYTES])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise
    return jaeger_spans(document)


def jaeger_spans(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Jaeger's `{"data": [{"spans": [...], "processes": {...}}]}` → trace-file records, by start."""
    records = []
    for trace in document.get("data") or ():
        processes = trace.get("processes") or {}
        for span in trace.get("spans") or ():
            parent = next((r.get("spanID") for r in span.get("references") or () if r.get("refType") == "CHILD_OF"),
                          None)  # fmt: skip
            start_us, duration_us = int(span.get("startTime", 0)), int(span.get("duration", 0))
            process = processes.get(span.get("processID"), {})
            records.append({
                "name": span.get("operationName", ""), "trace_id": span.get("traceID", ""),
                "span_id": span.get("spanID", ""), "parent_span_id": parent,
                "service": process.get("serviceName", ""),
                "start_ns": start_us * 1000, "end_ns": (start_us + duration_us) * 1000,
            })  # fmt: skip
    return sorted(records, key=lambda r: r["start_ns"])
