"""A new embedder version from shadow to 100 % through `meshserve rollout` while searches run: a
candidate without a complete shard set of its own gets nothing (and status says why); once its
shards pass, no search fails and none mixes versions (each answer's shards are its embedder's);
then the old version's embedder and shards are retired. Recall@10 on held-out photos per version."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from meshserve.gateway.status import read_status, render
from meshserve.local.demo import held_out_photos
from meshserve.registry.config import RegistryConfig
from tests.integration.mesh_parts import MeshParts, build_shard, search
from tests.integration.rollout_mesh import SearchLoad, card_version, put_rollout
from tests.support import DevAgent, ManagedProcess, meshserve_argv, wait_serving, wait_until


@pytest.mark.timeout(900)
def test_embedder_version_shadow_to_full_through_rollout_under_load(
    spawn: Callable[..., ManagedProcess], start_dev_agent: Callable[..., DevAgent], home_copy: Callable[[], Path],
    tmp_path: Path,
) -> None:
    import torch

    from meshserve.inference.artifacts import latest
    from meshserve.training.train import TrainPlan, run

    home = home_copy()
    old_dir = latest("embedder", home)
    assert old_dir is not None
    old = card_version(home, "embedder")
    old_shard = build_shard(home, tmp_path / "old", shard="old-s0")
    torch.set_num_threads(1)
    results, _ = run(TrainPlan(only=("embedder",), home=home, progress=False, tiny=True))
    new = card_version(home, "embedder")
    assert results[0].status == "trained" and new != old, results
    new_shard = build_shard(home, tmp_path / "new", shard="new-s0")
    prefix = {old: "old-", new: "new-"}

    agent = start_dev_agent()
    put_rollout(agent, "embedder", {"stable": old})
    parts = MeshParts(spawn, agent, home)
    started = [parts.server("detector"), parts.server("embedder", "--model", str(old_dir)),
               parts.server("embedder"), parts.server("indexer", "--shard", str(old_shard))]  # fmt: skip
    for server in started:
        wait_serving(server.target, server.proc, timeout=120)
    gateway = parts.gateway()
    photos = held_out_photos(home, 8)
    wait_until(lambda: search(gateway.target, photos[0].jpeg).versions["embedder"] == old, timeout=60,
               what="searches on the stable embedder")  # fmt: skip

    # A candidate with no shard set of its own gets nothing, and status says why.
    put_rollout(agent, "embedder", {"stable": old, "candidate": {"version": new, "canary_percent": 50}})
    wait_until(lambda: search(gateway.target, photos[0].jpeg, no_cache=True).versions["embedder"] == old
               and gateway.metric("meshserve_gateway_rollout_unroutable_total",
                                  f'service="embedder",version="{new}"') > 0,
               timeout=30, interval=0.2, what="the candidate chosen but unroutable without shards")  # fmt: skip
    assert {search(gateway.target, photos[0].jpeg, no_cache=True).versions["embedder"] for _ in range(10)} == {old}
    shown = render(asyncio.run(read_status(RegistryConfig.from_env(agent.http_addr))))
    assert f"candidate gets nothing: no shards built for embedder version {new}" in shown, shown
    put_rollout(agent, "embedder", {"stable": old})

    new_indexer = parts.server("indexer", "--shard", str(new_shard))
    wait_serving(new_indexer.target, new_indexer.proc, timeout=120)
    with SearchLoad(gateway.target, photos) as load:
        wait_until(lambda: len(load.answers) >= 10, timeout=60, what="searches running")
        rollout = spawn(meshserve_argv("rollout", "start", "embedder", "--version", new, "--shadow", "100",
                                       "--steps", "50,100", "--interval", "2s", "--min-requests", "3",
                                       "--min-agreement", "0", "--max-p99-ratio", "100"),
                        name="rollout", env={"CONSUL_HTTP_ADDR": agent.http_addr})  # fmt: skip
        assert rollout.wait(timeout=180) == 0, rollout.output()
        promoted_at = len(load.answers)
        wait_until(lambda: len(load.answers) > promoted_at + 5 and load.answers[-1]["versions"]["embedder"] == new,
                   timeout=60, what="searches on the promoted version")  # fmt: skip
        # The old version retired: its embedder and shard go, searches carry on.
        for server in (started[1], started[3]):
            server.proc.stop()
        retired_at = len(load.answers)
        wait_until(lambda: len(load.answers) > retired_at + 10, timeout=60, what="searches after the retirement")

    assert not load.failures, load.failures[:5]
    for answer in load.answers:
        version = answer["versions"]["embedder"]
        assert all(shard.startswith(prefix[version]) for shard in answer["shards"]), answer
        assert answer["coverage"] == (1, 1), answer
    state = json.loads(agent.client().kv.get("meshserve/rollout-state/embedder")[1]["Value"])
    decisions = [e["decision"] for e in state["events"]]
    assert state["status"] == "promoted" and decisions[0] == "started", decisions
    by_version = Counter(a["versions"]["embedder"] for a in load.answers)
    arms = Counter((a["versions"]["embedder"], a["arms"]["embedder"]) for a in load.answers)
    recall = {v: sum(a["hit"] for a in load.answers if a["versions"]["embedder"] == v) / n
              for v, n in by_version.items()}  # fmt: skip
    shadow = [e["figures"].get("shadow", {}).get("agreement") for e in state["events"] if e.get("figures")]
    print(f"embedder rollout {old} → {new}: {len(load.answers)} searches, 0 failed; answers per (version, arm) "
          f"{dict(arms)}; recall@10 on held-out photos {({v: round(r, 3) for v, r in recall.items()})}; "
          f"decisions {decisions}; shadow top-10 agreement per interval {shadow}")
    assert by_version[old] and by_version[new]
