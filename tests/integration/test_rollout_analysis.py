"""`meshserve rollout start` against a candidate detector that fails 20 % of its calls: the analysis
loop reads the gateway's per-version metrics and rolls it back on its own within two intervals,
with the decision and its figures in the run's events; callers only ever saw the canary's failures."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from meshserve.gateway.status import read_status, render
from meshserve.local.demo import held_out_photos
from meshserve.registry.config import RegistryConfig
from tests.integration.mesh_parts import MeshParts
from tests.integration.rollout_mesh import (
    DetectorCaller,
    Load,
    put_rollout,
    stable_and_candidate_detectors,
)
from tests.support import meshserve_argv, wait_until

INTERVAL_S = 2.0
VERDICT_OK, VERDICT_ERROR = 1, 5


@pytest.mark.timeout(600)
def test_an_erroring_candidate_is_rolled_back_within_two_intervals(
    parts: MeshParts,
    tmp_path: Path,
) -> None:
    home, agent = parts.home, parts.agent
    stable, candidate = stable_and_candidate_detectors(parts, home, tmp_path, "bad", "--inject-error-rate", "0.2")
    index = put_rollout(agent, "detector", {"stable": stable})
    gateway = parts.gateway()
    wait_until(lambda: gateway.metric("meshserve_gateway_rollout_policy_modify_index", 'service="detector"') == index,
               timeout=30, what="the stable-only policy in force")  # fmt: skip
    photo = held_out_photos(home, 1)[0].jpeg

    with Load(gateway.target, photo) as load:
        wait_until(lambda: len(load.verdicts) >= 10, timeout=60, what="load running")
        argv = meshserve_argv("rollout", "start", "detector", "--version", candidate, "--steps", "50,75,100",
                              "--interval", f"{INTERVAL_S}s", "--min-requests", "10",
                              "--max-error-rate", "0.05", "--max-p99-ratio", "100")  # fmt: skip
        rollout = parts.spawn(argv, name="rollout", env={"CONSUL_HTTP_ADDR": agent.http_addr})
        code = rollout.wait(timeout=120)
        assert code == 3, rollout.output()
        state = json.loads(agent.client().kv.get("meshserve/rollout-state/detector")[1]["Value"])
        # the gateway applies the rolled-back policy within a second; then only stable answers
        caller = DetectorCaller(gateway.target, photo)
        try:
            wait_until(lambda: {v.version for v in caller.many(8)} == {stable}, timeout=20,
                       what="stable only after the rollback")  # fmt: skip
        finally:
            caller.close()

    assert state["status"] == "rolled-back", state
    decisions = [e["decision"] for e in state["events"]]
    assert decisions[0] == "started" and decisions[-1] == "rollback", decisions
    analysed = decisions[1:]
    assert len(analysed) <= 2, f"rolled back after {len(analysed)} intervals: {state['events']}"
    rollback = state["events"][-1]
    took = rollback["at"] - state["events"][0]["at"]
    print(f"rollback {took:.1f}s after start ({len(analysed)} interval(s) of {INTERVAL_S:g}s): "
          f"{rollback['reasons']} {json.dumps(rollback['figures'])}")
    assert any("error rate" in reason for reason in rollback["reasons"]), rollback
    assert rollback["figures"]["candidate"]["error_rate"] > 0.05
    # Callers: failures only where the canary answered; the stable arm never failed.
    assert not load.failures, load.failures[:5]
    by_arm = Counter((version, arm, status) for _, version, arm, status in load.verdicts)
    assert by_arm[(candidate, "canary", VERDICT_ERROR)] > 0, by_arm
    assert all(status == VERDICT_OK for (version, _, status) in by_arm if version == stable), by_arm
    assert "rollout detector" in rollout.output() and "rollback" in rollout.output()
    shown = render(asyncio.run(read_status(RegistryConfig.from_env(agent.http_addr))))
    assert f"rollout of {candidate}: rolled-back, last decision rollback (error rate" in shown, shown


@pytest.mark.timeout(600)
def test_an_interrupted_rollout_resumes_where_it_stood(
    parts: MeshParts,
    tmp_path: Path,
) -> None:
    home, agent = parts.home, parts.agent
    stable, candidate = stable_and_candidate_detectors(parts, home, tmp_path, "good")
    put_rollout(agent, "detector", {"stable": stable})
    gateway = parts.gateway()
    argv = meshserve_argv("rollout", "start", "detector", "--version", candidate, "--steps", "20,40,100",
                          "--interval", f"{INTERVAL_S}s", "--min-requests", "5", "--max-p99-ratio", "100")

    def state() -> dict:
        return json.loads(agent.client().kv.get("meshserve/rollout-state/detector")[1]["Value"])

    with Load(gateway.target, held_out_photos(home, 1)[0].jpeg) as load:
        wait_until(lambda: len(load.verdicts) >= 10, timeout=60, what="load running")
        first = parts.spawn(argv, name="rollout-1", env={"CONSUL_HTTP_ADDR": agent.http_addr})
        wait_until(lambda: state()["step"] >= 1, timeout=60, what="the first step taken")
        first.kill()  # interrupted mid-run: no chance to clean up
        assert state()["status"] == "running"
        at_step = state()["step"]
        again = parts.spawn(argv, name="rollout-2", env={"CONSUL_HTTP_ADDR": agent.http_addr})
        assert again.wait(timeout=120) == 0, again.output()
        wait_until(lambda: {version for _, version, _, _ in load.verdicts[-5:]} == {candidate}, timeout=30,
                   what="the promoted version answering")  # fmt: skip
    events = state()["events"]
    decisions = [e["decision"] for e in events]
    resumed = decisions.index("resumed")
    assert events[resumed]["step"] == at_step and state()["status"] == "promoted", decisions
    assert decisions.count("started") == 1
    assert not load.failures, load.failures[:5]
