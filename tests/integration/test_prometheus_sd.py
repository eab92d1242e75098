"""`meshserve prometheus sd` against the dev agent: the passing replicas of the mesh's services that serve
/metrics, labelled from their registration; a stopped replica leaves; 503 while the registry is away."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from meshserve.registry import client
from meshserve.registry.config import RegistryConfig
from tests.integration.identity_server import start_identity
from tests.integration.registry_helpers import instance, start_health_target
from tests.support import free_port, meshserve_argv, wait_until


def sd_targets(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/targets", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        return json.load(resp)


async def test_sd_lists_passing_mesh_replicas_that_serve_metrics(dev_agent, spawn) -> None:
    config = RegistryConfig(http_addr=dev_agent.http_addr, request_timeout_s=3)
    first = start_identity(spawn, "--metrics-port", "0", register=True, consul=dev_agent.http_addr)
    second = start_identity(spawn, "--metrics-port", "0", register=True, consul=dev_agent.http_addr)
    # not targets: a passing replica without a metrics port, a replica whose check fails, another service
    _, plain_port = start_health_target(spawn)
    await client.register(config, instance(plain_port))
    dead_port = free_port()
    await client.register(config, instance(dead_port, meta={"model": "e", "version": "1", "role": "embedder",
                                                            "metrics_port": str(free_port())}))  # fmt: skip
    _, other_port = start_health_target(spawn, name="other")
    await client.register(config, instance(other_port, name="postgres", meta={"metrics_port": "9187"}))

    sd_port = free_port()
    sd = spawn(meshserve_argv("prometheus", "sd", "--port", str(sd_port), "--consul", dev_agent.http_addr), name="sd")

    def two_identities() -> list[dict[str, Any]]:
        sd.check_alive()
        groups = sd_targets(sd_port)
        return groups if len(groups) == 2 else []

    groups = wait_until(two_identities, timeout=30, interval=0.2, what="both identity servers as targets")
    by_id = {g["labels"]["instance_id"]: g for g in groups}
    for server in (first, second):
        group = by_id[f"meshserve-identity-127.0.0.1-{server.port}"]
        (target,) = group["targets"]
        host, _, port = target.rpartition(":")
        assert host == "127.0.0.1" and int(port) != server.port
        labels = group["labels"]
        assert labels["service"] == "meshserve-identity" and labels["model"] == "identity"
        assert labels["role"] and labels["version"] and "shard" not in labels
        # the registered port is the one /metrics answers on
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as resp:
            assert b"meshserve_server_inflight" in resp.read()

    # a replica that stops (deregisters) leaves the targets
    first.proc.stop()
    wait_until(lambda: [g["labels"]["instance_id"] for g in sd_targets(sd_port)]
               == [f"meshserve-identity-127.0.0.1-{second.port}"], timeout=20, interval=0.2)  # fmt: skip

    # the registry away: 503 (Prometheus keeps the targets it had), not an empty list
    dev_agent.stop()
    try:
        sd_targets(sd_port)
    except urllib.error.HTTPError as exc:
        assert exc.code == 503 and b"registry unavailable" in exc.read()
    else:
        raise AssertionError("expected 503 while the registry is stopped")
    sd.check_alive()
