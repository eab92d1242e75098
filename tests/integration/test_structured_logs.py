"""A real server's log lines are JSON (its stderr is a file) and those logged inside a call carry the caller's
trace id; a terminal gets text."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import grpc

from meshserve.v1 import prediction_pb2
from tests.integration.identity_server import stub
from tests.support import free_port, meshserve_argv, wait_serving, wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_server_logs_are_json_lines_with_the_callers_trace_id(spawn) -> None:
    port = free_port()
    proc = spawn(meshserve_argv("--log-level", "DEBUG", "serve", "identity", "--port", str(port), "--no-register"),
                 name="identity-json-logs", env={"OTEL_SDK_DISABLED": "true"})  # fmt: skip
    wait_serving(f"127.0.0.1:{port}", proc)
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:  # no inputs: INVALID_ARGUMENT, logged at DEBUG inside the call
            stub(channel).Predict(prediction_pb2.PredictRequest(), timeout=10, metadata=[("traceparent", traceparent)])
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("an empty Predict must be INVALID_ARGUMENT")

    def lines() -> list[dict]:
        return [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]

    in_call = wait_until(lambda: [line for line in lines() if line.get("trace_id") == TRACE_ID], timeout=20,
                         what="a log line of the call")  # fmt: skip
    assert in_call[0]["logger"] == "meshserve.rpc.interceptor" and "INVALID_ARGUMENT" in in_call[0]["message"]
    assert in_call[0]["span_id"] == "00f067aa0ba902b7"  # no tracer: the caller's span is the current one
    assert any(line["message"].startswith("serving on port") and "trace_id" not in line for line in lines())
    proc.stop()
    output = proc.log_path.read_text().splitlines()
    assert output and all(line.startswith("{") for line in output), output[:5]


def test_a_terminal_gets_text_lines() -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "meshserve.cli", "prometheus", "sd", "--port", str(free_port()),
                             "--consul", "http://127.0.0.1:1"], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)  # fmt: skip
    os.close(slave)
    try:
        out, deadline = b"", time.monotonic() + 60
        while b"service discovery on" not in out and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    out += os.read(master, 4096)
                except OSError:
                    break
        assert b" INFO meshserve.registry.prometheus_sd: Prometheus service discovery on" in out, out
        assert not out.lstrip().startswith(b"{")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
