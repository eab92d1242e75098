"""ServiceWatch with real processes: a replica SIGKILLed, the agent killed and restarted."""

from __future__ import annotations

import asyncio
import json
import time

from prometheus_client import REGISTRY

from meshserve.registry import client
from meshserve.registry.config import RegistryConfig
from meshserve.registry.watch import ServiceWatch
from tests.integration.registry_helpers import (
    CHECK_INTERVAL_S,
    FAST_WATCH,
    instance,
    start_health_target,
)


def ports_of(snap) -> set[int]:
    return {i.port for i in snap.instances}


async def test_sigkilled_replica_leaves_the_watch_within_interval_plus_one_second(dev_agent, spawn):
    config = RegistryConfig(http_addr=dev_agent.http_addr, request_timeout_s=3)
    targets = [start_health_target(spawn, name=f"replica{n}") for n in range(3)]
    ports = {port for _, port in targets}
    await asyncio.gather(*(client.register(config, instance(p)) for p in ports))

    async with ServiceWatch(config, "meshserve-embedder", FAST_WATCH) as watch:
        await watch.wait_for(lambda s: ports_of(s) == ports, timeout=CHECK_INTERVAL_S + 5)
        victim, victim_port = targets[1]
        killed_at = time.monotonic()
        victim.kill()  # SIGKILL: no NOT_SERVING, no deregistration
        snap = await watch.wait_for(lambda s: ports_of(s) == ports - {victim_port}, timeout=10)
        elapsed = time.monotonic() - killed_at
        assert not snap.stale
        # The bound: the watcher sees two within check interval + 1 s.
        assert elapsed <= CHECK_INTERVAL_S + 1.0, f"took {elapsed:.2f}s"


async def test_agent_outage_keeps_last_set_stale_then_reconciles_after_restart(
    start_dev_agent, spawn, tmp_path
):
    agent = start_dev_agent(data_dir=tmp_path / "consul-data")
    config = RegistryConfig(http_addr=agent.http_addr, request_timeout_s=2)
    targets = [start_health_target(spawn, name=f"replica{n}") for n in range(3)]
    ports = {port for _, port in targets}
    await asyncio.gather(*(client.register(config, instance(p)) for p in ports))
    changes: list[bool] = []

    async with ServiceWatch(
        config, "meshserve-embedder", FAST_WATCH, on_change=lambda s: changes.append(s.stale)
    ) as watch:
        await watch.wait_for(lambda s: ports_of(s) == ports, timeout=CHECK_INTERVAL_S + 5)
        # The registrations are on disk before the agent dies (it saves before acknowledging).
        saved = tmp_path / "consul-data" / "meshserve-dev-agent.json"
        services = {s["def"]["port"] for s in json.loads(saved.read_text())["services"]}
        assert ports <= services

        agent.kill()
        stale = await watch.wait_for(lambda s: s.stale, timeout=5)
        assert ports_of(stale) == ports, "the last known set must survive the outage"
        assert stale.stale_since is not None and stale.error
        async with asyncio.timeout(30):  # several failed reconnects with backoff
            while watch.staleness_s < 1.0:
                await asyncio.sleep(0.05)
        assert watch.stale and ports_of(watch.snapshot) == ports
        assert watch.staleness_s >= 1.0
        gauge = REGISTRY.get_sample_value(
            "meshserve_registry_watch_stale",
            {"kind": "service", "target": "meshserve-embedder"},
        )
        assert gauge == 1.0
        assert (
            REGISTRY.get_sample_value(
                "meshserve_registry_watch_staleness_seconds",
                {"kind": "service", "target": "meshserve-embedder"},
            )
            >= 1.0
        )

        # A change while the agent is away: one replica dies.
        victim, victim_port = targets[0]
        victim.kill()

        agent.start()  # same port, same --data-dir
        fresh = await watch.wait_for(
            lambda s: not s.stale and ports_of(s) == ports - {victim_port},
            timeout=CHECK_INTERVAL_S + 8,
        )
        assert fresh.stale_since is None and fresh.error is None
        assert watch.staleness_s == 0
        assert not changes[-1] and True in changes
