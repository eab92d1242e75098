"""`meshserve trace --jaeger`: Jaeger's trace document becomes the trace file's records and a waterfall.

No Jaeger runs on the build machines: a local HTTP server answers /api/traces/<id> with a document of
the shape Jaeger's query service returns (traceID, spanID, operationName, CHILD_OF references, start
and duration in microseconds, processes by id)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from meshserve.cli import main
from meshserve.local.traces import jaeger_spans

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
DOCUMENT = {"data": [{
    "traceID": TRACE,
    "spans": [
        {"traceID": TRACE, "spanID": "bbbb", "operationName": "detect", "startTime": 1_000_100, "duration": 300,
         "references": [{"refType": "CHILD_OF", "traceID": TRACE, "spanID": "aaaa"}], "processID": "p1"},
        {"traceID": TRACE, "spanID": "aaaa", "operationName": "meshserve.v1.PhotoSearch/Search",
         "startTime": 1_000_000, "duration": 900, "references": [], "processID": "p1"},
        {"traceID": TRACE, "spanID": "cccc", "operationName": "meshserve.v1.PredictionService/Predict",
         "startTime": 1_000_150, "duration": 200,
         "references": [{"refType": "CHILD_OF", "traceID": TRACE, "spanID": "bbbb"}], "processID": "p2"},
    ],
    "processes": {"p1": {"serviceName": "meshserve-gateway", "tags": []},
                  "p2": {"serviceName": "meshserve-detector", "tags": []}},
}]}  # fmt: skip


def test_jaeger_spans_become_trace_file_records_in_start_order() -> None:
    spans = jaeger_spans(DOCUMENT)
    assert [s["span_id"] for s in spans] == ["aaaa", "bbbb", "cccc"]
    assert spans[0]["parent_span_id"] is None and spans[2]["parent_span_id"] == "bbbb"
    assert spans[2]["service"] == "meshserve-detector"
    assert (spans[1]["start_ns"], spans[1]["end_ns"]) == (1_000_100_000, 1_000_400_000)


@pytest.fixture
def jaeger() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == f"/api/traces/{TRACE}":
                body, status = json.dumps(DOCUMENT).encode(), 200
            else:
                body, status = b'{"data":null,"errors":[{"code":404,"msg":"trace not found"}]}', 404
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_trace_reads_the_waterfall_from_jaeger(jaeger: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", TRACE, "--jaeger", jaeger]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"trace {TRACE}: 3 spans from meshserve-detector, meshserve-gateway")
    assert "    meshserve-detector: meshserve.v1.PredictionService/Predict" in out  # two levels down
    assert main(["trace", "0" * 32, "--jaeger", jaeger]) == 1
    assert "no span of trace" in capsys.readouterr().err
