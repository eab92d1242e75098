"""Rollout traffic splits with real processes: a 10 % canary of a second detector version over 1,000
requests, a policy that names one version shutting out the other, an invalid policy refused with
the last valid one kept, and a sticky A/B split that holds across two gateways and a restart."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from meshserve.gateway.status import read_status, render
from meshserve.local.demo import held_out_photos
from meshserve.registry.config import RegistryConfig
from tests.integration.mesh_parts import MeshParts, Started
from tests.integration.rollout_mesh import (
    DetectorCaller,
    detector_check,
    put_rollout,
    stable_and_candidate_detectors,
)
from tests.support import wait_until


def _policy_index(gateway: Started) -> float:
    return gateway.metric("meshserve_gateway_rollout_policy_modify_index", 'service="detector"')


@pytest.mark.timeout(600)
def test_canary_share_and_policy_that_shuts_out_unnamed_versions(
    parts: MeshParts,
    tmp_path: Path,
) -> None:
    home, agent = parts.home, parts.agent
    stable, candidate = stable_and_candidate_detectors(parts, home, tmp_path, "b")
    gateway = parts.gateway()
    caller = DetectorCaller(gateway.target, held_out_photos(home, 1)[0].jpeg)
    try:
        # Without a policy the newest version answers; a policy naming only the stable one shuts it out.
        wait_until(lambda: caller.one().version == candidate, timeout=60, what="the candidate routed (newest)")
        index = put_rollout(agent, "detector", {"stable": stable})
        wait_until(lambda: _policy_index(gateway) == index, timeout=20, what="the stable-only policy in force")
        assert {(v.version, v.arm) for v in caller.many(50)} == {(stable, "stable")}

        index = put_rollout(agent, "detector", {"stable": stable, "candidate": {"version": candidate,
                                                                                "canary_percent": 10}})
        wait_until(lambda: _policy_index(gateway) == index, timeout=20, what="the canary policy in force")
        verdicts = caller.many(1000)
        assert all(v.status == 1 for v in verdicts), Counter(v.detail for v in verdicts)
        arms = Counter((v.version, v.arm) for v in verdicts)
        assert set(arms) == {(stable, "stable"), (candidate, "canary")}, arms
        share = arms[(candidate, "canary")] / len(verdicts)
        print(f"canary share over {len(verdicts)} requests: {share:.3f}")
        assert 0.07 <= share <= 0.13, share
        counted = gateway.metric("meshserve_gateway_version_requests_total",
                                 f'arm="canary",outcome="ok",service="detector",version="{candidate}"')
        assert gateway.metric("meshserve_gateway_version_latency_seconds_count",
                              f'arm="stable",service="detector",version="{stable}"') >= arms[(stable, "stable")]
        assert counted == arms[(candidate, "canary")]

        # An invalid document is refused: the canary stays in force and status says why.
        put_rollout(agent, "detector", {"stable": stable, "candidate": {"version": candidate, "canary_percent": 300}})
        wait_until(lambda: gateway.metric("meshserve_gateway_rollout_policy_valid", 'service="detector"') == 0,
                   timeout=20, what="the invalid policy refused")  # fmt: skip
        assert _policy_index(gateway) == index
        assert {v.version for v in caller.many(200)} == {stable, candidate}
        shown = render(asyncio.run(read_status(RegistryConfig.from_env(agent.http_addr))))
        assert "detector       REFUSED" in shown and "candidate.canary_percent" in shown, shown
    finally:
        caller.close()


@pytest.mark.timeout(600)
def test_ab_split_is_sticky_across_gateways_and_a_restart(
    parts: MeshParts,
    tmp_path: Path,
) -> None:
    home, agent = parts.home, parts.agent
    stable, candidate = stable_and_candidate_detectors(parts, home, tmp_path, "b")
    index = put_rollout(agent, "detector", {"stable": stable, "candidate": {"version": candidate,
                                                                            "ab": {"percent": 50, "salt": "t"}}})
    photo = held_out_photos(home, 1)[0].jpeg
    subjects = [f"user-{i}" for i in range(40)]

    def arms_seen(gateway: Started) -> dict[str, tuple[str, str]]:
        wait_until(lambda: _policy_index(gateway) == index, timeout=30, what="the A/B policy in force")
        caller = DetectorCaller(gateway.target, photo)
        try:
            # each subject twice: stickiness within one gateway too
            first = {s: caller.one(s) for s in subjects}
            again = {s: caller.one(s) for s in subjects}
        finally:
            caller.close()
        assert {s: (v.version, v.arm) for s, v in first.items()} == {s: (v.version, v.arm) for s, v in again.items()}
        return {s: (v.version, v.arm) for s, v in first.items()}

    one, other = parts.gateway(), parts.gateway()
    seen_one, seen_other = arms_seen(one), arms_seen(other)
    assert seen_one == seen_other
    assert set(seen_one.values()) == {(stable, "ab-a"), (candidate, "ab-b")}
    # Without the metadata, the request's own field is the subject (here the listing id).
    for subject in subjects[:8]:
        verdict = detector_check(other.target, photo, listing_id=subject)
        assert (verdict.version, verdict.arm) == seen_one[subject]
    one.proc.stop()
    restarted = parts.gateway()
    assert arms_seen(restarted) == seen_one
