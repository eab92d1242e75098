"""The gateway's health follows its route table: NOT_SERVING (and critical in Consul) while photo search
has no route, SERVING from the moment it has one — the first search after that succeeds — and
NOT_SERVING again when a stage's last replica goes."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.local.demo import held_out_photos
from tests.integration.mesh_parts import NOT_SERVING, PHOTO_SEARCH, SERVING, MeshParts, build_shard, health, search
from tests.support import DevAgent, ManagedProcess, wait_until


def gateway_check_status(agent: DevAgent) -> str | None:
    with urllib.request.urlopen(f"{agent.http_addr}/v1/health/checks/meshserve-gateway", timeout=5) as resp:
        checks = json.load(resp)
    return checks[0]["Status"] if checks else None


def watch_until_serving(target: str, timeout: float) -> list[int]:
    """The statuses Health/Watch streams for PhotoSearch, up to and including the first SERVING."""
    seen = []
    with grpc.insecure_channel(target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=PHOTO_SEARCH),
                                                           timeout=timeout)  # fmt: skip
        for reply in stream:
            seen.append(reply.status)
            if reply.status == SERVING:
                stream.cancel()
                break
    return seen


@pytest.mark.timeout(900)  # above the sum of the waits below (300 + 5 × 60) and the setup
def test_photo_search_health_follows_the_route_table(
    spawn: Callable[..., ManagedProcess], start_dev_agent: Callable[..., DevAgent], home_copy: Callable[[], Path],
    tmp_path: Path,
) -> None:
    home = home_copy()
    shard = build_shard(home, tmp_path / "shard")
    photo = held_out_photos(home, 1)[0].jpeg
    agent = start_dev_agent()
    parts = MeshParts(spawn, agent, home)

    # A registry without model servers: the gateway runs and registers, but cannot serve.
    gateway = parts.gateway()
    assert health(gateway.target, PHOTO_SEARCH) == NOT_SERVING
    assert health(gateway.target, "") == NOT_SERVING
    wait_until(lambda: gateway_check_status(agent) == "critical", timeout=60, what="the gateway's check critical")
    with pytest.raises(grpc.RpcError) as refused:
        search(gateway.target, photo)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    parts.server("detector")
    embedder = parts.server("embedder")
    parts.server("indexer", "--shard", str(shard))
    seen = watch_until_serving(gateway.target, timeout=300)
    first = search(gateway.target, photo)  # the first search from the moment it says SERVING
    assert seen[0] == NOT_SERVING and seen[-1] == SERVING, seen
    assert first.coverage.shards_answered == first.coverage.shards_expected == 1
    assert health(gateway.target, "") == SERVING
    wait_until(lambda: gateway_check_status(agent) == "passing", timeout=60, what="the gateway's check passing")

    # Its only embedder gone: the route goes, and so does readiness (overall and per service).
    embedder.proc.kill()
    wait_until(lambda: health(gateway.target, PHOTO_SEARCH) == NOT_SERVING, timeout=60,
               what="PhotoSearch NOT_SERVING after the embedder's death")  # fmt: skip
    assert health(gateway.target, "") == NOT_SERVING
    wait_until(lambda: gateway_check_status(agent) == "critical", timeout=60, what="the gateway's check critical")
    gateway.proc.check_alive()
