"""A caller cannot pin the gateway's memory: oversized request fields are refused by name, searches
with large distinct labels stay within the result cache's byte budget, `no_cache` searches neither
read nor fill the cache, and the gateway's RSS stays within a stated bound through the flood."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from meshserve.local.demo import held_out_photos
from tests.integration.mesh_parts import PHOTO_SEARCH, SERVING, MeshParts, build_shard, health, search
from tests.support import DevAgent, ManagedProcess, wait_until

CACHE_BUDGET_MB = 2
RSS_BOUND_MB = 100  # growth allowed through the whole flood; 40 × 8 MB of labels kept would be 320 MB


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.timeout(600)
def test_a_flood_of_large_labels_keeps_the_gateway_within_its_memory_bound(
    spawn: Callable[..., ManagedProcess], start_dev_agent: Callable[..., DevAgent], home_copy: Callable[[], Path],
    tmp_path: Path,
) -> None:
    home = home_copy()
    shard = build_shard(home, tmp_path / "shard")
    photo = held_out_photos(home, 1)[0].jpeg
    parts = MeshParts(spawn, start_dev_agent(), home)
    gateway = parts.gateway("--cache-max-mb", str(CACHE_BUDGET_MB))
    for kind, extra in (("detector", ()), ("embedder", ()), ("indexer", ("--shard", str(shard)))):
        parts.server(kind, *extra)
    wait_until(lambda: health(gateway.target, PHOTO_SEARCH) == SERVING, timeout=300, what="PhotoSearch SERVING")
    for _ in range(5):
        search(gateway.target, photo, no_cache=True)
    before = rss_mb(gateway.proc.pid)

    # Beyond the limits: refused by name, before anything is kept.
    def oversized(n: int) -> grpc.StatusCode:
        labels = [f"{n}-{i}-" + "x" * 8000 for i in range(1000)]  # ~8 MB of distinct labels
        try:
            search(gateway.target, photo, labels=labels)
        except grpc.RpcError as exc:
            assert "labels:" in (exc.details() or ""), exc.details()
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(4) as pool:
        refused = list(pool.map(oversized, range(40)))
    assert refused == [grpc.StatusCode.INVALID_ARGUMENT] * 40

    # Within the limits: 64 distinct labels of 128 bytes per search, each result cached under them.
    def within(n: int) -> None:
        search(gateway.target, photo, labels=[f"{n:05d}-{i:03d}-".ljust(128, "x") for i in range(64)])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(within, range(600)))
    cache_bytes = gateway.metric("meshserve_gateway_cache_bytes", 'cache="search"')
    entries = gateway.metric("meshserve_gateway_cache_entries", 'cache="search"')
    assert 0 < cache_bytes <= CACHE_BUDGET_MB * 1024 * 1024
    assert 0 < entries < 600  # the byte budget, not the entry limit (10 000), evicted the rest

    # no_cache: no lookup, no entry
    lookups = gateway.metric("meshserve_gateway_cache_lookups_total", 'cache="search"')
    for n in range(20):
        search(gateway.target, photo, labels=[f"no-cache-{n}"], no_cache=True)
    assert gateway.metric("meshserve_gateway_cache_lookups_total", 'cache="search"') == lookups
    assert gateway.metric("meshserve_gateway_cache_entries", 'cache="search"') == entries

    after = rss_mb(gateway.proc.pid)
    print(f"\ngateway RSS {before:.0f} MB before, {after:.0f} MB after 40 refused 8 MB-label searches and 600 "
          f"cached 8 KB-label ones; search cache {cache_bytes / 1024:.0f} KiB in {entries:.0f} entries")
    assert after - before < RSS_BOUND_MB, (before, after)
    gateway.proc.check_alive()
