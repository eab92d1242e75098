"""Keeping one instance registered for as long as it serves (local anti-entropy).

Consul's agent keeps its local services in sync with the catalog; but if the agent itself loses
them (a dev agent restarted without a data dir, an agent rebuilt), nothing would bring them back.
So a server re-checks every `resync_s` that its agent still knows it, and registers again if not,
unless the instance was withdrawn on purpose (a retired shard: registry/retired_shards.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from meshserve.errors import InvalidInput
from meshserve.registry.client import RegistryClient
from meshserve.registry.config import RegistryConfig, ServiceInstance

log = logging.getLogger(__name__)


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True if `stop` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def keep_registered(
    config: RegistryConfig,
    instance: ServiceInstance,
    stop: asyncio.Event,
    resync_s: float = 10.0,
    on_registered: Callable[[], None] = lambda: None,
    withdrawn: Callable[[RegistryClient], Awaitable[str | None]] | None = None,
) -> None:
    """Register `instance` (retrying with backoff while Consul is away), then re-register whenever
    the agent no longer lists it, until `stop` is set. InvalidInput (Consul would never accept
    it) is raised to the caller.

    `withdrawn(client)` is asked before each registration: a reason (the operator took the
    instance out on purpose) ends the keeping, None registers. So a process restarted after its
    shard was retired does not bring the shard back either."""
    delay = 0.25
    registered = False
    while not stop.is_set():
        try:
            async with RegistryClient(config) as client:
                if registered:
                    services = await client.call("list agent services", client.consul.agent.services())
                    if instance.instance_id in services:
                        delay = 0.25
                        if await _wait(stop, resync_s):
                            return
                        continue
                    log.warning("the agent no longer knows %s", instance.instance_id)
                reason = await withdrawn(client) if withdrawn is not None else None
                if reason is not None:
                    log.warning("not registering %s: %s", instance.instance_id, reason)
                    return
                if registered:
                    log.warning("registering %s again", instance.instance_id)
                await client.register(instance)
        except InvalidInput:
            raise
        except Exception as exc:  # noqa: BLE001 - Consul away: serve on, try again later
            log.warning("registration of %s: %s; retrying in %.1fs", instance.instance_id, exc, delay)
            if await _wait(stop, delay):
                return
            delay = min(delay * 2, 5.0)
            continue
        if not registered:
            registered = True
            on_registered()
        if await _wait(stop, resync_s):
            return
