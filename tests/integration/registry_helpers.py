"""Shared bits of the registry client integration tests: health targets and instances."""

from __future__ import annotations

import sys
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.registry.config import ServiceInstance
from meshserve.registry.watch import WatchConfig
from tests.support import ManagedProcess, free_port, wait_until

# Short waits and backoff so outages are noticed and healed within the tests' bounds.
FAST_WATCH = WatchConfig(wait_s=5, backoff_initial_s=0.05, backoff_max_s=0.4)
CHECK_INTERVAL_S = 1.0


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def start_health_target(
    spawn: Callable[..., ManagedProcess], name: str = "target"
) -> tuple[ManagedProcess, int]:
    """A real gRPC health server (tests/health_target.py) in its own process, SERVING."""
    port = free_port()
    proc = spawn([sys.executable, "-m", "tests.health_target", "--port", str(port)], name=name)
    wait_until(lambda: serving(port), timeout=20, what=f"health target on {port}")
    return proc, port


def instance(port: int, name: str = "meshserve-embedder", **changes: object) -> ServiceInstance:
    fields: dict[str, object] = {
        "name": name,
        "instance_id": f"{name}-127.0.0.1-{port}",
        "address": "127.0.0.1",
        "port": port,
        "meta": {"model": "embedder", "version": "7", "role": "embedder", "extra": "x"},
        "tags": ("v7", "test"),
        "check_interval_s": CHECK_INTERVAL_S,
        "check_timeout_s": 0.5,
        "deregister_critical_after_s": 60.0,
    }
    fields.update(changes)
    return ServiceInstance(**fields)  # type: ignore[arg-type]
