"""A listing classifier under a rollout policy: a canary of a second version answers its share of
checks with `arm = canary`, the stable answers are shadowed to it, and the score agreement appears."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from meshserve.v1 import listing_guard_pb2
from tests.integration.guard_mesh import GuardMesh, listing
from tests.integration.rollout_mesh import put_rollout
from tests.support import DevAgent, Spawner, wait_until


@pytest.mark.timeout(600)
def test_classifier_canary_and_shadow(
    spawn: Spawner, start_dev_agent: Callable[..., DevAgent], home_copy: Callable[[], Path], tmp_path: Path,
) -> None:
    mesh = GuardMesh(spawn, home_copy(), start_dev_agent())
    assert mesh.agent.client().kv.put("meshserve/config/listing-guard",
                                      '{"models": {"counterfeit": {"timeout_ms": 5000}}}')
    mesh.serve("classifier", "--model", "counterfeit")
    candidate_dir = mesh.classifier_copy("counterfeit", "b", tmp_path)
    mesh.serve("classifier", "--model", str(candidate_dir), name="counterfeit-b")
    mesh.start_gateway()
    titles = iter(f"ceramic mug number {n}" for n in range(10_000))  # fresh titles: no cached verdict

    def counterfeit() -> listing_guard_pb2.Verdict:
        (verdict,) = mesh.check(listing(title=next(titles), models=("counterfeit",))).verdicts
        return verdict

    candidate = wait_until(lambda: (v := counterfeit()).version.endswith("-b") and v.version, timeout=60,
                           what="the candidate routed (newest, no policy yet)")  # fmt: skip
    stable = candidate.removesuffix("-b")
    index = put_rollout(mesh.agent, "counterfeit", {"stable": stable, "candidate": {
        "version": candidate, "canary_percent": 20, "shadow_percent": 100}})
    wait_until(lambda: f'meshserve_gateway_rollout_policy_modify_index{{service="counterfeit"}} {index}.0'
               in mesh.metrics(), timeout=30, what="the policy in force")  # fmt: skip
    answers = [counterfeit() for _ in range(200)]
    arms = Counter((v.version, v.arm) for v in answers)
    assert set(arms) == {(stable, "stable"), (candidate, "canary")}, arms
    assert 0.1 <= arms[(candidate, "canary")] / len(answers) <= 0.3, arms
    labels = f'measure="agreement",service="counterfeit",version="{candidate}"'

    def agreement_count() -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in mesh.metrics().splitlines()
                   if line.startswith("meshserve_gateway_shadow_agreement_count{") and labels in line)  # fmt: skip

    wait_until(lambda: agreement_count() >= 50, timeout=30, what="shadow comparisons recorded")
    text = mesh.metrics()
    total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("meshserve_gateway_shadow_agreement_sum{") and labels in line)  # fmt: skip
    assert total / agreement_count() == pytest.approx(1.0)  # same weights under another version id
    assert 'measure="score_diff"' in text
