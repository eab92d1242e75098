"""Log lines of every meshserve process: JSON objects when stderr is not a terminal, with the trace and span ids.

`MESHSERVE_LOG_FORMAT=json|text` overrides the choice (`auto`, the default, picks JSON for files,
pipes and journals, text for a person at a terminal). Inside a request (a gRPC call's trace
context, a search's stage) every line carries `trace_id` and `span_id`, so a log line leads to its
trace (`meshserve trace TRACE_ID`) and a trace to its log lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import TextIO

from opentelemetry import trace

LOG_FORMAT_ENV = "MESHSERVE_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def current_ids() -> tuple[str, str]:
    """(trace_id, span_id) of the current span in hex, ("", "") outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, pid, and
    trace_id/span_id inside a trace; `exception` holds a traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        trace_id, span_id = current_ids()
        if trace_id:
            line["trace_id"], line["span_id"] = trace_id, span_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def wants_json(stream: TextIO, setting: str | None = None) -> bool:
    choice = (setting if setting is not None else os.environ.get(LOG_FORMAT_ENV, "auto")).strip().lower()
    if choice not in ("auto", "json", "text"):
        raise ValueError(f"{LOG_FORMAT_ENV}={choice!r}: use auto, json or text")
    if choice == "auto":
        return not (hasattr(stream, "isatty") and stream.isatty())
    return choice == "json"


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """The root logger of a meshserve command: JSON lines or text on stderr (see the module docstring)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if wants_json(stream) else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
