"""`meshserve serve identity` end to end: registry, Predict, metadata, health, reflection, SIGTERM."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import consul
import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from meshserve.v1 import prediction_pb2
from meshserve.wire import tensors
from tests.conftest import DevAgent
from tests.integration.identity_server import (
    PREDICTION_SERVICE,
    predict_request,
    start_identity,
    stub,
)
from tests.support import ManagedProcess, free_port, meshserve_argv, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "meshserve-identity"


def _consul(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port)


def _passing(agent: DevAgent) -> list[dict]:
    _, entries = _consul(agent).health.service(SERVICE, passing=True)
    return entries


def test_identity_registers_answers_and_traces(
    spawn: Callable[..., ManagedProcess], dev_agent: DevAgent, tmp_path: Path
) -> None:
    trace_file = tmp_path / "spans.jsonl"
    server = start_identity(
        spawn,
        "--name", "echo", "--model-version", "3",
        "--trace-file", str(trace_file),
        register=True, consul=dev_agent.http_addr,
    )  # fmt: skip

    entries = wait_until(lambda: _passing(dev_agent), timeout=20, what="identity passing")
    assert len(entries) == 1
    service = entries[0]["Service"]
    assert service["Port"] == server.port
    assert service["Meta"]["model"] == "echo"
    assert service["Meta"]["version"] == "3"
    assert service["Meta"]["role"] == "identity"
    assert service["Meta"]["dtype"] == "float32"  # model-specific meta
    checks = {c["CheckID"]: c for c in entries[0]["Checks"] if c["ServiceID"]}
    assert len(checks) == 1 and next(iter(checks.values()))["Status"] == "passing"

    assert server.health("") == SERVING
    assert server.health(PREDICTION_SERVICE) == SERVING

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_span = "00f067aa0ba902b7"
    with server.channel() as channel:
        x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
        reply = stub(channel).Predict(
            predict_request(x, tags=[b"a", b"bb", b"ccc"], request_id="r1"),
            timeout=5,
            metadata=[("traceparent", f"00-{trace_id}-{parent_span}-01")],
        )
        assert (reply.model_name, reply.model_version, reply.request_id) == ("echo", "3", "r1")
        np.testing.assert_array_equal(tensors.array_from(reply.outputs["y"]), x)
        assert tensors.array_from(reply.outputs["tag"]) == [b"a", b"bb", b"ccc"]

        only_y = stub(channel).Predict(predict_request(x, output_filter=["y"]), timeout=5)
        assert set(only_y.outputs) == {"y"}

        meta = stub(channel).GetModelMetadata(prediction_pb2.GetModelMetadataRequest(), timeout=5)
        assert (meta.name, meta.version, meta.role) == ("echo", "3", "identity")
        assert [s.name for s in meta.inputs] == ["x", "tag"]
        assert list(meta.inputs[0].shape) == [-1, -1]
        assert meta.max_batch_size == 8
        assert meta.meta["dtype"] == "float32"

        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert PREDICTION_SERVICE in services
        assert "grpc.health.v1.Health" in services
        assert "grpc.reflection.v1alpha.ServerReflection" in services

    text = server.metrics()
    assert 'method="Predict"' in text and "meshserve_server_batch_size_bucket" in text
    assert server.metric("meshserve_server_requests_total") >= 3

    # SIGTERM: deregistered, exit 0; the span it exported continues our trace
    server.proc.signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0
    assert not _passing(dev_agent)
    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    ours = [s for s in spans if s["trace_id"] == trace_id]
    assert ours, spans
    assert ours[0]["parent_span_id"] == parent_span
    assert ours[0]["kind"] == "SERVER"
    assert ours[0]["name"] == "meshserve.v1.PredictionService/Predict"


def test_a_sampling_server_follows_its_callers_sampled_flag(
    spawn: Callable[..., ManagedProcess], tmp_path: Path
) -> None:
    """With parent-based sampling that never starts a trace itself, a server records the span of a
    call whose caller sampled its trace, and none for an unsampled caller or a call without one:
    a search's trace is whole or absent, never cut."""
    trace_file = tmp_path / "spans.jsonl"
    server = start_identity(spawn, "--trace-file", str(trace_file),
                            env={"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                 "OTEL_TRACES_SAMPLER_ARG": "0"})  # fmt: skip
    sampled, unsampled = "4bf92f3577b34da6a3ce929d0e0e4736", "5cf92f3577b34da6a3ce929d0e0e4737"
    x = np.ones((1, 2), np.float32)
    with server.channel() as channel:
        for trace_id, flags in ((sampled, "01"), (unsampled, "00"), (None, "")):
            metadata = [("traceparent", f"00-{trace_id}-00f067aa0ba902b7-{flags}")] if trace_id else None
            stub(channel).Predict(predict_request(x), timeout=5, metadata=metadata)
    server.proc.signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0  # flushes the exporter
    spans = [json.loads(line) for line in trace_file.read_text().splitlines()] if trace_file.exists() else []
    assert [s["trace_id"] for s in spans] == [sampled], spans


def test_sigterm_turns_not_serving_deregisters_and_drains(
    spawn: Callable[..., ManagedProcess], dev_agent: DevAgent
) -> None:
    # every model call costs 1.5 s, so calls are surely in flight when SIGTERM arrives
    server = start_identity(
        spawn, "--batch-cost-ms", "1500", "--max-queue-delay-ms", "100", "--grace", "8",
        register=True, consul=dev_agent.http_addr,
    )  # fmt: skip
    wait_until(lambda: _passing(dev_agent), timeout=20, what="identity passing")

    channel = server.channel()
    predict = stub(channel).Predict
    predict(predict_request(np.ones((1, 2), np.float32)), timeout=10)  # connected
    xs = [np.full((1, 4), i, np.float32) for i in range(4)]
    calls = [predict.future(predict_request(x), timeout=20) for x in xs]
    wait_until(lambda: server.metric("meshserve_server_inflight") == 4, timeout=5, what="4 in flight")

    sent = time.monotonic()
    server.proc.signal(signal.SIGTERM)
    wait_until(lambda: server.health(PREDICTION_SERVICE) == NOT_SERVING, timeout=2,
               what="NOT_SERVING while draining")  # fmt: skip
    assert server.health("") == NOT_SERVING
    wait_until(lambda: not _consul(dev_agent).agent.services(), timeout=2, what="deregistered")
    assert all(not call.done() for call in calls), "calls finished before the drain was observed"
    # a new call during the drain is turned away (so a client retries elsewhere)
    try:
        predict(predict_request(np.ones((1, 2), np.float32)), timeout=2)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    else:
        raise AssertionError("a new call was accepted while draining")

    for x, call in zip(xs, calls, strict=True):
        np.testing.assert_array_equal(tensors.array_from(call.result().outputs["y"]), x)
    assert server.proc.wait(timeout=10) == 0
    assert time.monotonic() - sent < 8, "did not exit within the grace period"
    channel.close()


def test_a_registration_consul_would_refuse_stops_the_server_with_a_message(
    spawn: Callable[..., ManagedProcess],
) -> None:
    proc = spawn(
        meshserve_argv(
            "serve", "identity", "--port", str(free_port()),
            "--consul", "http://127.0.0.1:1", "--instance-id", "has a space",
        ),
        name="identity-bad-id",
    )  # fmt: skip
    assert proc.wait(timeout=30) == 2
    output = proc.output()
    assert "cannot register" in output and "has a space" in output
