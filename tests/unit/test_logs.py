"""Log lines: JSON with trace and span ids inside a trace when stderr is not a terminal, text at a terminal."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from meshserve.logs import TEXT_FORMAT, JsonFormatter, wants_json


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("meshserve.x", logging.WARNING, __file__, 1, message, args, exc_info)


def test_a_line_inside_a_trace_carries_its_trace_and_span_ids() -> None:
    outside = json.loads(JsonFormatter().format(record("served %d → %s", 3, "ok")))
    assert outside["message"] == "served 3 → ok" and outside["level"] == "WARNING"
    assert outside["logger"] == "meshserve.x" and outside["time"].endswith("+00:00")
    assert "trace_id" not in outside and "span_id" not in outside
    span = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                       trace_flags=TraceFlags(1))  # fmt: skip
    with trace.use_span(NonRecordingSpan(span)):
        inside = json.loads(JsonFormatter().format(record("failed", exc=True)))
    assert inside["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and inside["span_id"] == "00f067aa0ba902b7"
    assert "RuntimeError: boom" in inside["exception"]


def test_json_for_files_and_pipes_text_for_a_terminal_unless_told() -> None:
    assert wants_json(io.StringIO(), "auto") and not wants_json(Terminal(), "auto")
    assert wants_json(Terminal(), "json") and not wants_json(io.StringIO(), "TEXT")
    with pytest.raises(ValueError, match="auto, json or text"):
        wants_json(io.StringIO(), "yaml")
    assert "%(message)s" in TEXT_FORMAT
