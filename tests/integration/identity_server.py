"""Start `meshserve serve identity` as a real process and talk to it (shared by runtime tests)."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.v1 import prediction_pb2, prediction_pb2_grpc
from meshserve.wire import tensors
from tests.support import ManagedProcess, free_port, meshserve_argv, wait_until

PREDICTION_SERVICE = "meshserve.v1.PredictionService"


@dataclass
class IdentityServer:
    proc: ManagedProcess
    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def health(self, service: str = "", timeout: float = 1.0) -> int:
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return reply.status

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total


def start_identity(
    spawn: Callable[..., ManagedProcess],
    *args: str,
    register: bool = False,
    consul: str | None = None,
    env: dict[str, str] | None = None,
) -> IdentityServer:
    """A running identity server (SERVING) on free ports; `args` are extra flags."""
    port, metrics_port = free_port(), free_port()
    argv = ["serve", "identity", "--port", str(port), "--metrics-port", str(metrics_port), *args]
    if register:
        assert consul is not None
        argv += ["--consul", consul, "--check-interval", "0.5"]
    else:
        argv.append("--no-register")
    proc = spawn(meshserve_argv(*argv), name="identity", env=env)
    server = IdentityServer(proc, port, metrics_port)

    def serving() -> bool:
        assert proc.alive(), proc.output()
        return server.health() == health_pb2.HealthCheckResponse.SERVING

    wait_until(serving, timeout=30, what=f"identity server SERVING\n{proc.output()}")
    return server


def predict_request(
    x: np.ndarray, tags: Sequence[bytes] | None = None, **fields: object
) -> prediction_pb2.PredictRequest:
    request = prediction_pb2.PredictRequest(**fields)  # type: ignore[arg-type]
    request.inputs["x"].CopyFrom(tensors.tensor_from(x))
    if tags is not None:
        request.inputs["tag"].CopyFrom(tensors.tensor_from(list(tags)))
    return request


def stub(channel: grpc.Channel) -> prediction_pb2_grpc.PredictionServiceStub:
    return prediction_pb2_grpc.PredictionServiceStub(channel)
