"""ModelServer in this process on port 0 with real gRPC: loading state, error mapping, tracing ids."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.errors import FailedPrecondition, InvalidInput
from meshserve.servers.model import Model
from meshserve.servers.server import ModelServer, ServerConfig
from meshserve.v1 import prediction_pb2, prediction_pb2_grpc
from meshserve.wire import tensors
from meshserve.wire.signature import Arrays, Params, Signature, TensorSpec

SERVICE = "meshserve.v1.PredictionService"


class Picky(Model):
    """Loads only when told to; fails in the ways a real model can."""

    name, version, role = "picky", "2", "test"
    signature = Signature(
        inputs=(TensorSpec("x", "float32", (-1, 2)),), outputs=(TensorSpec("y", "float32", (-1, 2)),)
    )

    def __init__(self) -> None:
        self.may_load = threading.Event()
        self.warmed = False

    def load(self) -> None:
        assert self.may_load.wait(10)

    def warmup(self) -> None:
        self.warmed = True

    def check(self, inputs: Arrays, params: Params) -> None:
        x = inputs["x"]
        assert isinstance(x, np.ndarray)
        if np.isnan(x).any():
            raise FailedPrecondition("x: NaN is not a valid query")

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        x = inputs["x"]
        assert isinstance(x, np.ndarray)
        if (x < 0).any():
            raise InvalidInput("x: negative values are not allowed by this model")
        if (x > 1000).any():
            raise RuntimeError("model exploded")
        return {"y": x + 1}


def _request(*values: float) -> prediction_pb2.PredictRequest:
    request = prediction_pb2.PredictRequest()
    request.inputs["x"].CopyFrom(tensors.tensor_from(np.array([values], np.float32)))
    return request


async def test_loading_state_error_mapping_and_trace_ids(caplog: pytest.LogCaptureFixture) -> None:
    model = Picky()
    server = ModelServer(model, ServerConfig(service_name="meshserve-test", register=False))
    running = asyncio.ensure_future(server.run())
    try:
        deadline = time.monotonic() + 10
        while not server.port:
            assert time.monotonic() < deadline and not running.done()
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            predict = prediction_pb2_grpc.PredictionServiceStub(channel).Predict

            async def status(service: str) -> int:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                return reply.status

            # loading: listening, but NOT_SERVING and every Predict is UNAVAILABLE
            assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await status(SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await predict(_request(1, 2), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in (info.value.details() or "")

            model.may_load.set()
            while await status(SERVICE) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert model.warmed

            reply = await predict(_request(1, 2), timeout=5)
            np.testing.assert_array_equal(tensors.array_from(reply.outputs["y"]), [[2, 3]])

            cases = [
                (_request(float("nan"), 1), grpc.StatusCode.FAILED_PRECONDITION, "NaN"),
                (_request(-1, 1), grpc.StatusCode.INVALID_ARGUMENT, "negative values"),
            ]
            for request, code, words in cases:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await predict(request, timeout=5)
                assert info.value.code() == code and words in (info.value.details() or "")

            # a bug: INTERNAL, the details name the caller's trace id and so does the log
            trace_id = "0af7651916cd43dd8448eb211c80319c"
            with caplog.at_level(logging.ERROR, logger="meshserve.rpc.interceptor"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await predict(
                        _request(5000, 1),
                        timeout=5,
                        metadata=(("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"),),
                    )
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert trace_id in (info.value.details() or "")
            assert "model exploded" not in (info.value.details() or "")  # no internals leak
            assert any(trace_id in r.getMessage() and r.exc_info for r in caplog.records)

            reply = await predict(_request(3, 4), timeout=5)  # still serving
            np.testing.assert_array_equal(tensors.array_from(reply.outputs["y"]), [[4, 5]])
    finally:
        server.request_stop()
        assert await asyncio.wait_for(running, 15) == 0


class Unloadable(Picky):
    def load(self) -> None:
        raise FileNotFoundError("no weights at /nope")


async def test_a_model_that_fails_to_load_exits_1_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = ModelServer(Unloadable(), ServerConfig(service_name="meshserve-test", register=False))
    with caplog.at_level(logging.ERROR, logger="meshserve.rpc.process"):
        assert await asyncio.wait_for(server.run(), 15) == 1
    assert any("failed to load" in r.getMessage() and r.exc_info for r in caplog.records)
