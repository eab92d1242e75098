"""Retired index shards, marked in the registry's KV store so that no server registers them again.

`meshserve shard retire` deregisters every replica of a shard, but a server keeps itself registered
(registry/keeper.py) and would put the shard back at its next resync. Before it registers an
instance (the first time too: `meshserve up` restarts a crashed indexer), a server serving the shard
looks for the shard's key here; a retired shard stays out until it is published again (publishing
removes the key). A process that serves several shards keeps serving the others.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from meshserve.registry.acl_policies import RETIRED_SHARDS_PREFIX
from meshserve.registry.client import RegistryClient

log = logging.getLogger(__name__)


def retired_key(shard: str) -> str:
    return RETIRED_SHARDS_PREFIX + shard


async def mark_retired(client: RegistryClient, shard: str, instance_ids: list[str]) -> None:
    """Record that `shard` is retired (first, so no replica comes back while the rest are deregistered)."""
    await client.kv_put(retired_key(shard), json.dumps({"retired_at": time.time(), "instances": instance_ids}))


async def unmark_retired(client: RegistryClient, shard: str) -> None:
    """A shard published again may register again."""
    await client.kv_delete(retired_key(shard))


async def retired_shards(client: RegistryClient) -> dict[str, dict[str, Any]]:
    """Every retired shard → its mark ({"retired_at": epoch seconds, "instances": [...]}; {} when a
    mark does not read as one)."""
    marks = await client.kv_get_prefix(RETIRED_SHARDS_PREFIX)
    out: dict[str, dict[str, Any]] = {}
    for key, text in sorted(marks.items()):
        try:
            mark = json.loads(text)
        except ValueError:
            mark = None
        out[key.removeprefix(RETIRED_SHARDS_PREFIX)] = mark if isinstance(mark, dict) else {}
    return out


async def is_retired(client: RegistryClient, shard: str) -> bool:
    return await client.kv_get(retired_key(shard)) is not None


async def withdrawn_shard(client: RegistryClient, shard: str) -> str | None:
    """For registry/keeper.py: why a server must not register `shard` again, or None. A registry that
    cannot say (away, or the token may not read the key) does not keep a shard out."""
    try:
        retired = await is_retired(client, shard)
    except Exception as exc:  # noqa: BLE001 - registering again is the safe side
        log.warning("cannot tell whether shard %s was retired (%s); registering it again", shard, exc)
        return None
    return f"shard {shard} was retired (key {retired_key(shard)})" if retired else None
