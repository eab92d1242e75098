"""The dev agent's check runner against a real in-process gRPC health server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshserve.registry.dev.checks import CheckRunner
from meshserve.registry.dev.schema import parse_service
from meshserve.registry.dev.state import DevState, NodeInfo
from tests.support import free_port


@pytest.fixture
async def target() -> AsyncIterator[tuple[int, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await servicer.set("embedder", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield port, servicer
    await server.stop(0)


async def test_grpc_probe_outputs(target: tuple[int, health.aio.HealthServicer]) -> None:
    port, _ = target
    state = DevState(NodeInfo("id", "node", "127.0.0.1"))
    runner = CheckRunner(state, min_interval=0.05)
    try:
        _, [ok] = parse_service({"Name": "a", "Check": {"GRPC": f"127.0.0.1:{port}",
                                                       "Interval": "1s"}})
        _, [down] = parse_service({"Name": "b", "Check": {"GRPC": f"127.0.0.1:{port}/embedder",
                                                         "Interval": "1s"}})
        _, [gone] = parse_service({"Name": "c", "Check": {"GRPC": f"127.0.0.1:{free_port()}",
                                                         "Interval": "1s"}})
        assert await runner.probe(ok, 1.0) == ("passing", f"gRPC check 127.0.0.1:{port}: success")
        status, output = await runner.probe(down, 1.0)
        assert status == "critical" and "NOT_SERVING" in output
        status, output = await runner.probe(gone, 1.0)
        assert status == "critical" and "UNAVAILABLE" in output
    finally:
        await runner.close()


async def test_one_channel_per_target_closed_with_its_last_check(
    target: tuple[int, health.aio.HealthServicer],
) -> None:
    port, _ = target
    state = DevState(NodeInfo("id", "node", "127.0.0.1"))
    runner = CheckRunner(state, min_interval=0.05)
    try:
        for sid in ("s1", "s2"):
            service, checks = parse_service({"Name": "a", "ID": sid, "Check": {
                "GRPC": f"127.0.0.1:{port}", "Interval": "50ms"}})
            state.register_service(service, checks)
        for _ in range(100):
            if all(c.status == "passing" for c in state.checks.values()):
                break
            await asyncio.sleep(0.02)
        assert state.checks["service:s1"].status == state.checks["service:s2"].status == "passing"
        assert len(runner._grpc.keys()) == 1  # both checks share one channel
        state.deregister_service("s1")
        await asyncio.sleep(0.05)
        assert len(runner._grpc.keys()) == 1  # still used by s2
        state.deregister_service("s2")
        await asyncio.sleep(0.05)
        assert runner._grpc.keys() == set()
    finally:
        await runner.close()
