"""Every kind of bad request gets its own status and message, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest

from meshserve.v1 import prediction_pb2, tensor_pb2
from meshserve.wire import tensors
from tests.integration.identity_server import predict_request, start_identity, stub
from tests.support import ManagedProcess, wait_until

DT = tensor_pb2.DataType
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _raw(dtype: int, shape: list[int], content: bytes = b"", elements: list[bytes] | None = None):
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, content=content, elements=elements or [])


def _request(**inputs: tensor_pb2.Tensor) -> prediction_pb2.PredictRequest:
    request = prediction_pb2.PredictRequest()
    for name, tensor in inputs.items():
        request.inputs[name].CopyFrom(tensor)
    return request


GOOD_X = np.arange(8, dtype=np.float32).reshape(2, 4)

# (case, request, expected status, words the message must contain)
CASES = [
    (
        "wrong dtype",
        _request(x=tensors.tensor_from(GOOD_X.astype(np.int32))),
        INVALID,
        ["inputs['x'].dtype", "int32", "float32"],
    ),
    (
        "wrong rank",
        _request(x=tensors.tensor_from(np.zeros((2, 2, 2), np.float32))),
        INVALID,
        ["inputs['x'].shape", "rank 3", "rank 2"],
    ),
    (
        "byte length does not match shape",
        _request(x=_raw(DT.DATA_TYPE_FLOAT32, [2, 4], b"\0" * 31)),
        INVALID,
        ["inputs['x'].content", "31 bytes", "needs 32"],
    ),
    (
        "negative dim",
        _request(x=_raw(DT.DATA_TYPE_FLOAT32, [-2, 4], b"")),
        INVALID,
        ["inputs['x'].shape[0]", "negative"],
    ),
    (
        "huge dims",
        _request(x=_raw(DT.DATA_TYPE_FLOAT32, [1, 2**62], b"\0" * 16)),
        INVALID,
        ["inputs['x'].shape[1]", "exceeds the maximum"],
    ),
    (
        "huge batch",
        _request(x=_raw(DT.DATA_TYPE_FLOAT32, [2**40, 1], b"\0" * 16)),
        INVALID,
        ["inputs['x'].shape[0]", "exceeds the maximum 1024"],
    ),
    (
        "empty batch",
        _request(x=_raw(DT.DATA_TYPE_FLOAT32, [0, 4], b"")),
        INVALID,
        ["inputs['x'].shape[0]", "empty batch"],
    ),
    ("no inputs at all", _request(), INVALID, ["inputs", "empty"]),
    (
        "unknown input name",
        _request(x=tensors.tensor_from(GOOD_X), z=tensors.tensor_from(GOOD_X)),
        INVALID,
        ["inputs['z']", "unknown input"],
    ),
    (
        "missing input",
        _request(tag=tensors.tensor_from([b"a", b"b"])),
        INVALID,
        ["inputs['x']", "missing"],
    ),
    (
        "BYTES element count does not match shape",
        _request(x=tensors.tensor_from(GOOD_X), tag=_raw(DT.DATA_TYPE_BYTES, [3], elements=[b"a"])),
        INVALID,
        ["inputs['tag'].elements", "1 elements", "needs 3"],
    ),
    (
        "BYTES element over its limit",
        _request(x=tensors.tensor_from(GOOD_X), tag=tensors.tensor_from([b"a", b"b" * 2000])),
        INVALID,
        ["inputs['tag'].elements[1]", "2000 bytes"],
    ),
    (
        "inputs with different batch sizes",
        _request(x=tensors.tensor_from(GOOD_X), tag=tensors.tensor_from([b"a"])),
        INVALID,
        ["batch size"],
    ),
    (
        "unspecified dtype",
        _request(x=_raw(DT.DATA_TYPE_UNSPECIFIED, [2, 4], b"\0" * 32)),
        INVALID,
        ["inputs['x'].dtype"],
    ),
    (
        "unknown parameter",
        prediction_pb2.PredictRequest(
            inputs={"x": tensors.tensor_from(GOOD_X)},
            parameters={"k": prediction_pb2.ParameterValue(int_value=3)},
        ),
        INVALID,
        ["parameters['k']", "unknown parameter"],
    ),
    (
        "unknown output in filter",
        prediction_pb2.PredictRequest(inputs={"x": tensors.tensor_from(GOOD_X)}, output_filter=["nope"]),
        INVALID,
        ["output_filter", "nope"],
    ),
    (
        "unknown model name",
        predict_request(GOOD_X, model_name="resnet"),
        grpc.StatusCode.NOT_FOUND,
        ["model_name", "resnet"],
    ),
    (
        "unknown model version",
        predict_request(GOOD_X, model_version="7"),
        grpc.StatusCode.NOT_FOUND,
        ["model_version", "'7'"],
    ),
    (
        "message over the limit",
        predict_request(np.zeros((1, 300_000), np.float32)),  # 1.2 MB > --max-message-bytes
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        [],
    ),
]


def test_each_bad_input_gets_its_status_and_the_server_keeps_serving(
    spawn: Callable[..., ManagedProcess],
) -> None:
    server = start_identity(spawn, "--max-message-bytes", str(1024 * 1024))
    with server.channel() as channel:
        predict = stub(channel).Predict
        failures = []
        for case, request, code, words in CASES:
            with pytest.raises(grpc.RpcError) as info:
                predict(request, timeout=5)
            err = info.value
            if err.code() != code or not all(w in (err.details() or "") for w in words):
                failures.append(f"{case}: got {err.code()} {err.details()!r}, want {code} {words}")
            # and the server still answers a good request right after
            reply = predict(predict_request(GOOD_X, request_id=case), timeout=5)
            assert reply.request_id == case
            np.testing.assert_array_equal(tensors.array_from(reply.outputs["y"]), GOOD_X)
        assert not failures, "\n".join(failures)
        metadata = stub(channel).GetModelMetadata
        with pytest.raises(grpc.RpcError) as info:
            metadata(prediction_pb2.GetModelMetadataRequest(model_name="resnet"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.proc.alive()
    invalid = sum(1 for case in CASES if case[2] == INVALID)
    requests = server.metric("meshserve_server_requests_total", method="Predict", code="OK")
    assert requests == len(CASES)
    assert server.metric("meshserve_server_requests_total", code="INVALID_ARGUMENT") == invalid


def test_expired_deadline_is_refused_and_never_computed(
    spawn: Callable[..., ManagedProcess],
) -> None:
    # one model call at a time, each costing 400 ms: a second caller with a 150 ms deadline
    # expires while queued behind the first and must be dropped, not computed.
    server = start_identity(spawn, "--batch-cost-ms", "400", "--max-batch-size", "1")
    with server.channel() as channel:
        predict = stub(channel).Predict
        predict(predict_request(GOOD_X), timeout=5)  # connect + one computed call
        computed_before = server.metric("meshserve_server_batch_size_count")
        slow = predict.future(predict_request(GOOD_X, request_id="slow"), timeout=5)
        # the slow call is admitted (and, the queue being empty, computing) before the late one comes
        wait_until(lambda: server.metric("meshserve_server_inflight") >= 1, timeout=10, interval=0.005)
        with pytest.raises(grpc.RpcError) as info:
            predict(predict_request(GOOD_X, request_id="late"), timeout=0.15)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert slow.result().request_id == "slow"
        # the queue is swept when the next batch forms
        assert predict(predict_request(GOOD_X), timeout=5).model_name == "identity"
        computed = server.metric("meshserve_server_batch_size_count") - computed_before
        assert computed == 2, f"expected only 'slow' and the last call computed, got {computed}"
        assert server.metric("meshserve_server_dropped_expired_total") >= 1
        # a deadline already spent on arrival gets its status too, and the server goes on
        with pytest.raises(grpc.RpcError) as info:
            predict(predict_request(GOOD_X), timeout=0.0001)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert predict(predict_request(GOOD_X), timeout=5).model_name == "identity"
