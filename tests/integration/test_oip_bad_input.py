"""Open Inference Protocol calls an identity server must refuse: the status OIP clients expect, a
message naming the tensor, over gRPC and HTTP, and the server stays healthy. Also what it registers
(protocols, HTTP port) and what `meshserve status` shows of it."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from meshserve.oip import grpc_predict_v2_pb2 as pb
from meshserve.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from meshserve.v1 import prediction_pb2_grpc
from meshserve.wire import tensors
from tests.conftest import DevAgent
from tests.integration.identity_server import IdentityServer, predict_request, start_identity
from tests.support import ManagedProcess, free_port, meshserve_argv, wait_until

INVALID = grpc.StatusCode.INVALID_ARGUMENT
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def infer_request(**fields: Any) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="identity", **fields)


def x_input(datatype: str = "FP32", shape: tuple[int, ...] = (2, 4)) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=list(shape))


def typed_x() -> pb.ModelInferRequest.InferInputTensor:
    tensor = x_input()
    tensor.contents.fp32_contents.extend(X.reshape(-1).tolist())
    return tensor


def tag_input(n: int = 2) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name="tag", datatype="BYTES", shape=[n])


def prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# (case, request, status, words the message must contain)
CASES = [
    ("wrong datatype string", infer_request(inputs=[x_input("FLOAT32")], raw_input_contents=[X.tobytes()]),
     INVALID, ["inputs['x'].datatype", "'FLOAT32'", "not an OIP datatype"]),
    ("datatype not the signature's", infer_request(inputs=[x_input("FP64")], raw_input_contents=[b"\0" * 64]),
     INVALID, ["inputs['x'].datatype", "got FP64", "expected FP32"]),
    ("raw and typed contents both set", infer_request(inputs=[typed_x()], raw_input_contents=[X.tobytes()]),
     INVALID, ["inputs['x']", "both contents and raw_input_contents"]),
    ("raw content of the wrong length", infer_request(inputs=[x_input()], raw_input_contents=[X.tobytes()[:-1]]),
     INVALID, ["inputs['x']", "31 bytes", "needs 32"]),
    ("typed content of the wrong count", infer_request(inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[3, 4], contents=pb.InferTensorContents(fp32_contents=[1.0] * 8))]),
     INVALID, ["inputs['x'].contents.fp32_contents", "8 values", "needs 12"]),
    ("unknown output name", infer_request(inputs=[typed_x()], outputs=[
        pb.ModelInferRequest.InferRequestedOutputTensor(name="z")]),
     INVALID, ["outputs['z']", "unknown output"]),
    ("BYTES element with a truncated length prefix",
     infer_request(inputs=[x_input(), tag_input()], raw_input_contents=[X.tobytes(), prefixed(b"ok") + b"\x05\x00"]),
     INVALID, ["inputs['tag']", "element 1", "truncated length prefix"]),
    ("BYTES element longer than what is left",
     infer_request(inputs=[x_input(), tag_input()],
                   raw_input_contents=[X.tobytes(), prefixed(b"ok") + b"\x09\0\0\0ab"]),
     INVALID, ["inputs['tag']", "element 1 declares 9 bytes"]),
    ("FP16 in typed form", infer_request(inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP16", shape=[1, 1], contents=pb.InferTensorContents(fp32_contents=[1.0]))]),
     INVALID, ["inputs['x']", "FP16"]),
    ("fewer raw contents than inputs", infer_request(inputs=[x_input(), tag_input()], raw_input_contents=[X.tobytes()]),
     INVALID, ["raw_input_contents", "1 entries for 2 inputs"]),
    ("unknown parameter", infer_request(inputs=[typed_x()], parameters={"k": pb.InferParameter(int64_param=3)}),
     INVALID, ["parameters['k']", "unknown parameter"]),
    ("unknown model", pb.ModelInferRequest(model_name="resnet", inputs=[typed_x()]),
     grpc.StatusCode.NOT_FOUND, ["'resnet'", "not served here"]),
    ("unknown version", infer_request(model_version="7", inputs=[typed_x()]),
     grpc.StatusCode.NOT_FOUND, ["version '7'"]),
]  # fmt: skip


@pytest.fixture
def server(spawn: Callable[..., ManagedProcess]) -> tuple[IdentityServer, int]:
    http_port = free_port()
    return start_identity(spawn, "--http-port", str(http_port)), http_port


def oip(server: IdentityServer) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = server.channel()
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def http(port: int, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body)
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_bad_oip_input_gets_its_status_naming_the_tensor(server: tuple[IdentityServer, int]) -> None:
    identity, http_port = server
    channel, stub = oip(identity)
    with channel:
        for case, request, code, words in CASES:
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, timeout=10)
            assert err.value.code() == code, (case, err.value.details())
            for word in words:
                assert word in str(err.value.details()), (case, err.value.details())
        with pytest.raises(grpc.RpcError) as err:  # declared by KServe, not served by a one-model server
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="identity"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelReady(pb.ModelReadyRequest(name="resnet"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # still healthy, and a good call in either form answers
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="identity", version="1"), timeout=10).ready
        reply = stub.ModelInfer(infer_request(inputs=[typed_x()], id="r-1"), timeout=10)
        assert (reply.id, [o.name for o in reply.outputs]) == ("r-1", ["y"])
        assert np.frombuffer(reply.raw_output_contents[0], np.float32).tobytes() == X.tobytes()
    assert identity.proc.alive()
    # each refusal was counted under its status, as Predict's are
    assert identity.metric("meshserve_server_requests_total", method="ModelInfer", code="INVALID_ARGUMENT") >= 10


def test_oip_and_predict_answer_alike_in_both_input_forms(server: tuple[IdentityServer, int]) -> None:
    identity, _ = server
    tags = [b"first", b"\x00second"]
    raw = infer_request(inputs=[x_input(), tag_input()], raw_input_contents=[X.tobytes(), prefixed(*tags)])
    typed_tags = tag_input()
    typed_tags.contents.bytes_contents.extend(tags)
    typed = infer_request(inputs=[typed_x(), typed_tags])
    channel, stub = oip(identity)
    with channel:
        replies = [stub.ModelInfer(r, timeout=10) for r in (raw, typed)]
        predicted = prediction_pb2_grpc.PredictionServiceStub(channel).Predict(
            predict_request(X, tags=tags), timeout=10
        )
    want_y = predicted.outputs["y"].content
    for reply in replies:
        outputs = {o.name: (o, c) for o, c in zip(reply.outputs, reply.raw_output_contents, strict=True)}
        y, y_raw = outputs["y"]
        assert (y.datatype, list(y.shape), y_raw) == ("FP32", [2, 4], want_y)
        tag, tag_raw = outputs["tag"]
        want_tag = prefixed(*tensors.array_from(predicted.outputs["tag"]))  # type: ignore[arg-type]
        assert (tag.datatype, list(tag.shape), tag_raw) == ("BYTES", [2], want_tag)


def test_rest_form_errors_and_health(server: tuple[IdentityServer, int]) -> None:
    _, port = server
    assert http(port, "/v2/health/live") == (200, {"live": True})
    assert http(port, "/v2/health/ready") == (200, {"ready": True})
    assert http(port, "/v2/models/identity/versions/1/ready") == (200, {"ready": True})
    status, body = http(port, "/v2/models/resnet/ready")
    assert status == 404 and "'resnet'" in body["error"]
    status, meta = http(port, "/v2/models/identity")
    assert status == 200 and meta["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, -1]}
    good = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.tolist()}], "id": "j"}
    status, reply = http(port, "/v2/models/identity/infer", json.dumps(good).encode())
    assert status == 200 and reply["id"] == "j"
    assert reply["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 4], "data": X.reshape(-1).tolist()}]
    for body, words in (
        (b"{not json", ["not JSON"]),
        (json.dumps({"inputs": [{**good["inputs"][0], "datatype": "FLOAT"}]}).encode(),  # type: ignore[dict-item]
         ["inputs['x'].datatype", "'FLOAT'"]),
        (json.dumps({"inputs": [{**good["inputs"][0], "data": [1.0] * 7}]}).encode(),  # type: ignore[dict-item]
         ["inputs['x'].data", "7 values"]),
        (json.dumps({**good, "outputs": [{"name": "z"}]}).encode(), ["outputs['z']"]),
    ):  # fmt: skip
        status, reply = http(port, "/v2/models/identity/infer", body)
        assert status == 400, reply
        assert all(w in reply["error"] for w in words), reply
    status, reply = http(port, "/v2/models/resnet/infer", json.dumps(good).encode())
    assert status == 404 and "'resnet'" in reply["error"]
    assert http(port, "/v2/health/ready") == (200, {"ready": True})


def test_overload_is_resource_exhausted(spawn: Callable[..., ManagedProcess]) -> None:
    """Four calls at once at a server admitting one, whose model takes 2 s: one answers, the rest
    are refused at once, as Predict's are."""
    identity = start_identity(spawn, "--max-inflight", "1", "--delay-ms", "2000", "--max-batch-size", "1")
    one_row = pb.ModelInferRequest(model_name="identity", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 1], contents=pb.InferTensorContents(fp32_contents=[1.0]))])  # fmt: skip
    channel, stub = oip(identity)
    with channel:
        calls = [stub.ModelInfer.future(one_row, timeout=30) for _ in range(4)]
        codes = sorted(call.code().name for call in calls)
    assert codes == ["OK"] + ["RESOURCE_EXHAUSTED"] * 3, codes


def test_registers_its_protocols_and_status_shows_them(
    spawn: Callable[..., ManagedProcess], dev_agent: DevAgent
) -> None:
    http_port = free_port()
    start_identity(spawn, "--http-port", str(http_port), "--service-name", "meshserve-classifier",
                   register=True, consul=dev_agent.http_addr)  # fmt: skip
    client = dev_agent.client()
    [entry] = wait_until(lambda: client.health.service("meshserve-classifier", passing=True)[1],
                         timeout=20, what="identity passing in the registry")  # fmt: skip
    meta = entry["Service"]["Meta"]
    assert meta["protocols"] == "meshserve-v1,oip-v2-grpc,oip-v2-http"
    assert meta["http_port"] == str(http_port)
    status = subprocess.run(meshserve_argv("status", "--consul", dev_agent.http_addr),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert f"meshserve-v1,oip-v2-grpc,oip-v2-http (http :{http_port})" in status.stdout, status.stdout


def test_oip_calls_are_traced_and_counted_like_predict(spawn: Callable[..., ManagedProcess], tmp_path: Path) -> None:
    """Both OIP forms continue the caller's trace in a server span and count in the server's metrics."""
    spans_file = tmp_path / "spans.jsonl"
    http_port = free_port()
    identity = start_identity(spawn, "--http-port", str(http_port), "--trace-file", str(spans_file))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    channel, stub = oip(identity)
    with channel:
        stub.ModelInfer(infer_request(inputs=[typed_x()]), timeout=10, metadata=(("traceparent", traceparent),))
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.tolist()}]})
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v2/models/identity/infer", data=body.encode(),
                                     headers={"traceparent": traceparent})  # fmt: skip
    with urllib.request.urlopen(request, timeout=20) as reply:
        assert reply.status == 200

    def both_spans() -> list[dict[str, Any]]:
        if not spans_file.exists():
            return []
        spans = [json.loads(line) for line in spans_file.read_text().splitlines() if line.strip()]
        ours = [s for s in spans if s["trace_id"] == trace_id and s["kind"] == "SERVER"]
        return ours if len(ours) == 2 else []

    spans = wait_until(both_spans, timeout=20, what="two server spans in the caller's trace")
    assert {s["name"] for s in spans} == {"inference.GRPCInferenceService/ModelInfer"}
    assert {s["attributes"]["rpc.system"] for s in spans} == {"grpc", "oip-http"}
    assert identity.metric("meshserve_server_requests_total", method="ModelInfer", code="OK") == 1
    assert identity.metric("meshserve_server_requests_total", method="http:ModelInfer", code="OK") == 1


def test_draining_server_is_unavailable_and_not_ready(spawn: Callable[..., ManagedProcess]) -> None:
    """After SIGTERM, while an admitted call finishes: new OIP calls UNAVAILABLE / 503, ready false."""
    http_port = free_port()
    identity = start_identity(spawn, "--http-port", str(http_port), "--delay-ms", "3000", "--grace", "20")
    one_row = pb.ModelInferRequest(model_name="identity", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 1], contents=pb.InferTensorContents(fp32_contents=[1.0]))])  # fmt: skip
    channel, stub = oip(identity)
    with channel:
        held = stub.ModelInfer.future(one_row, timeout=30)
        wait_until(lambda: identity.metric("meshserve_server_inflight") == 1, timeout=10, what="one call admitted")
        identity.proc.signal(signal.SIGTERM)
        wait_until(lambda: not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready, timeout=10,
                   what="ServerReady false while draining")  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(one_row, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in str(err.value.details())
        assert not stub.ModelReady(pb.ModelReadyRequest(name="identity"), timeout=5).ready
        status, body = http(http_port, "/v2/health/ready")
        assert status == 503 and "draining" in body["error"]
        assert list(held.result().outputs[0].shape) == [1, 1]  # the admitted call still finished
    assert identity.proc.wait(30) == 0
