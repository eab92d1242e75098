"""A hung registry (the dev agent stopped with SIGSTOP: its sockets stay open, nothing answers) is
noticed by a watch within its probe interval plus the request timeout, not after a blocking wait."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from meshserve.registry import client
from meshserve.registry.config import RegistryConfig
from meshserve.registry.watch import ServiceWatch, WatchConfig
from tests.integration.registry_helpers import instance, start_health_target

# A blocking wait far longer than the test: only the probe can notice the hang in time.
HUNG_WATCH = WatchConfig(wait_s=120, backoff_initial_s=0.05, backoff_max_s=0.5, probe_interval_s=1.0)


async def test_a_stopped_agent_makes_the_watch_stale_within_probe_plus_timeout(dev_agent, spawn):
    config = RegistryConfig(http_addr=dev_agent.http_addr, request_timeout_s=2)
    _, port = start_health_target(spawn, name="replica")
    await client.register(config, instance(port))
    async with ServiceWatch(config, "meshserve-embedder", HUNG_WATCH) as watch:
        await watch.wait_for(lambda s: {i.port for i in s.instances} == {port} and not s.stale, timeout=15)
        await asyncio.sleep(0.2)  # the next blocking query is on its way
        stopped_at = time.monotonic()
        os.kill(dev_agent.proc.pid, signal.SIGSTOP)
        try:
            snap = await watch.wait_for(lambda s: s.stale, timeout=30)
            noticed = time.monotonic() - stopped_at
        finally:
            os.kill(dev_agent.proc.pid, signal.SIGCONT)
        assert {i.port for i in snap.instances} == {port}  # the last known set, kept
        bound = HUNG_WATCH.probe_interval_s + config.request_timeout_s
        assert noticed <= bound + 3.0, f"noticed after {noticed:.1f}s, bound {bound:.1f}s"
        snap = await watch.wait_for(lambda s: not s.stale, timeout=15)
        assert {i.port for i in snap.instances} == {port}
    print(f"\nhung agent noticed after {noticed:.1f}s (blocking wait {HUNG_WATCH.wait_s:.0f}s)")
