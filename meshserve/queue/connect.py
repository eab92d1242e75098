"""Finding NATS (NATS_URL, else the registry's `meshserve-nats`, else the default) and connecting."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from meshserve.queue.config import DEFAULT_NATS_URL, NATS_SERVICE
from meshserve.registry.config import RegistryConfig

log = logging.getLogger(__name__)


async def find_nats(registry: RegistryConfig | None, explicit: str | None = None) -> str:
    """The NATS URL to use: `explicit`, $NATS_URL, a passing `meshserve-nats` in the registry, the default."""
    if url := explicit or os.environ.get("NATS_URL"):
        return url
    if registry is not None:
        from meshserve.registry.client import passing_instances

        try:
            found = await passing_instances(registry, NATS_SERVICE)
        except Exception as exc:  # noqa: BLE001 - the registry away: fall back to the default
            log.warning("cannot read %s from the registry (%s); trying %s", NATS_SERVICE, exc, DEFAULT_NATS_URL)
            found = ()
        if found:
            return f"nats://{found[0].target}"
    return DEFAULT_NATS_URL


async def connect(url: str, name: str, connect_timeout_s: float = 2.0) -> Any:
    """A NATS connection that reconnects for ever (a restarted server is found again)."""
    import nats

    async def disconnected() -> None:
        log.info("NATS %s: disconnected", url)

    async def reconnected() -> None:
        log.info("NATS %s: reconnected", url)

    async def error(exc: Exception) -> None:
        log.debug("NATS %s: %s", url, exc)

    # Reconnecting for ever also retries the first connect for ever: bound that one, so a caller
    # can look in the registry again (NATS may have come up elsewhere).
    return await asyncio.wait_for(
        nats.connect(url, name=name, connect_timeout=connect_timeout_s, max_reconnect_attempts=-1,
                     reconnect_time_wait=0.25, allow_reconnect=True, disconnected_cb=disconnected,
                     reconnected_cb=reconnected, error_cb=error),
        timeout=connect_timeout_s * 2)  # fmt: skip
