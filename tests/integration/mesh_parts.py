"""A mesh put together piece by piece from real processes (a gateway, model servers, one shard),
for tests that need to start and kill the pieces in their own order."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.v1 import photo_search_pb2, photo_search_pb2_grpc
from tests.support import DevAgent, ManagedProcess, free_port, meshserve_argv, wait_until

PHOTO_SEARCH = "meshserve.v1.PhotoSearch"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def build_shard(home: Path, out_dir: Path, shard: str = "s-0") -> Path:
    """One shard over the whole catalogue, for the newest embedder in `home`."""
    from meshserve.inference.artifacts import latest
    from meshserve.training.catalogue import load_items
    from meshserve.training.shard_build import ItemSlice, build_from_catalogue

    embedder = latest("embedder", home)
    assert embedder is not None
    ids = [item.item_id for item in load_items(home)]
    build_from_catalogue(out_dir, ItemSlice("ids", ids[0], ids[-1] + 1), embedder=str(embedder), shard=shard,
                         home=home)  # fmt: skip
    return out_dir


@dataclass
class Started:
    proc: ManagedProcess
    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of the samples of `name` whose labels contain `labels`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + ("{" if labels else "")) and labels in line)  # fmt: skip


class MeshParts:
    """Starts gateways and model servers against `agent`, with `home`'s models, through `spawn`."""

    def __init__(self, spawn: Callable[..., ManagedProcess], agent: DevAgent, home: Path):
        self.spawn = spawn
        self.agent = agent
        self.home = home

    def _env(self) -> dict[str, str]:
        return {"MESHSERVE_HOME": str(self.home), "CONSUL_HTTP_ADDR": self.agent.http_addr}

    def gateway(self, *extra: str) -> Started:
        port, metrics = free_port(), free_port()
        proc = self.spawn(meshserve_argv("gateway", "--port", str(port), "--metrics-port", str(metrics),
                                         "--check-interval", "1", *extra), name="gateway", env=self._env())
        started = Started(proc, port, metrics)

        def answers_health() -> bool:
            proc.check_alive()
            return health(started.target) is not None

        wait_until(answers_health, timeout=60, what="the gateway's health service")
        return started

    def server(self, kind: str, *extra: str) -> Started:
        port, metrics = free_port(), free_port()
        proc = self.spawn(meshserve_argv("serve", kind, "--port", str(port), "--metrics-port", str(metrics),
                                         "--check-interval", "1", "--threads", "1", *extra),
                          name=kind, env=self._env())  # fmt: skip
        return Started(proc, port, metrics)

    def passing(self, service: str) -> list[dict]:
        url = f"{self.agent.http_addr}/v1/health/service/{service}?passing"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)  # type: ignore[no-any-return]


def health(target: str, service: str = "") -> int | None:
    """The server's health status for `service`, None when it does not answer."""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=2)  # fmt: skip
    except grpc.RpcError:
        return None
    return reply.status  # type: ignore[no-any-return]


def search(target: str, image: bytes, timeout: float = 20, **fields: object) -> photo_search_pb2.SearchResponse:
    with grpc.insecure_channel(target) as channel:
        request = photo_search_pb2.SearchRequest(image=image, min_detection_score=0.01, **fields)  # type: ignore[arg-type]
        return photo_search_pb2_grpc.PhotoSearchStub(channel).Search(request, timeout=timeout)
