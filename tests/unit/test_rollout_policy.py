"""Rollout policy documents: validation naming the field, and the per-request arm choice."""

from __future__ import annotations

import json
import random

import pytest

from meshserve.gateway.rollout_policy import (
    AB_A,
    AB_B,
    CANARY,
    STABLE,
    RolloutPolicyError,
    choose_arm,
    parse_rollout,
)


def _doc(**candidate: object) -> str:
    return json.dumps({"stable": "1", "candidate": {"version": "2", **candidate}})


def test_a_document_round_trips_through_its_dataclass() -> None:
    policy = parse_rollout("detector", _doc(canary_percent=10, shadow_percent=50), "7")
    assert policy.stable == "1" and policy.candidate is not None and policy.candidate.canary_percent == 10
    assert parse_rollout("detector", json.dumps(policy.to_document())).candidate == policy.candidate


@pytest.mark.parametrize(("text", "field"), [
    ("{", "not JSON"),
    (json.dumps({"candidate": {"version": "2"}}), "stable"),
    (_doc(canary_percent=101), "candidate.canary_percent"),
    (_doc(canary_percent=10, ab={"percent": 50}), "exclusive"),
    (json.dumps({"stable": "1", "candidate": {"version": "1"}}), "candidate.version"),
    (json.dumps({"stable": "1", "analysis": {"max_error_rate": 2}}), "analysis.max_error_rate"),
    (json.dumps({"stable": "1", "surprise": 1}), "unknown key 'surprise'"),
])  # fmt: skip
def test_an_invalid_document_is_refused_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(RolloutPolicyError, match=field):
        parse_rollout("detector", text)


def test_an_unknown_service_is_refused() -> None:
    with pytest.raises(RolloutPolicyError, match="unknown service"):
        parse_rollout("toaster", _doc())


def test_canary_share_follows_the_percent() -> None:
    policy = parse_rollout("detector", _doc(canary_percent=10))
    rng = random.Random(3)
    arms = [choose_arm(policy, "", rng.random(), rng.random()).arm for _ in range(10_000)]
    assert 0.09 < arms.count(CANARY) / len(arms) < 0.11
    assert set(arms) == {CANARY, STABLE}


def test_ab_is_sticky_per_subject_and_splits_subjects() -> None:
    policy = parse_rollout("detector", _doc(ab={"percent": 50, "salt": "x"}))
    rng = random.Random(5)
    for subject in ("alice", "bob", "carol"):
        seen = {choose_arm(policy, subject, rng.random(), rng.random()).arm for _ in range(50)}
        assert len(seen) == 1
    arms = [choose_arm(policy, f"user-{i}", 0.5, 0.5).arm for i in range(2000)]
    assert 0.45 < arms.count(AB_B) / len(arms) < 0.55 and AB_A in arms


def test_shadow_goes_with_stable_answers_only() -> None:
    policy = parse_rollout("detector", _doc(canary_percent=50, shadow_percent=100))
    assert choose_arm(policy, "", 0.9, 0.0).shadow == "2"
    assert choose_arm(policy, "", 0.1, 0.0).shadow is None  # the candidate answers itself


def test_the_gateway_keeps_the_last_valid_rollout_and_drops_it_when_deleted() -> None:
    from prometheus_client import REGISTRY

    from meshserve.gateway.rollout_store import RolloutPolicies
    from meshserve.registry.config import RegistryConfig
    from meshserve.registry.watch import KVSnapshot

    def docs(**by_service: tuple[str, int]) -> KVSnapshot:
        value = {f"meshserve/rollout/{service}": doc for service, doc in by_service.items()}
        return KVSnapshot(target="meshserve/rollout/", value=value, version=1, index=1, ready=True, stale=False,
                          stale_since=None, last_contact=None)  # fmt: skip

    def valid() -> float | None:
        return REGISTRY.get_sample_value("meshserve_gateway_rollout_policy_valid", {"service": "detector"})

    policies = RolloutPolicies(RegistryConfig())
    assert policies.policy("detector") is None and policies.policy("not-a-service") is None

    policies._changed(docs(detector=(_doc(canary_percent=10), 5)))
    in_force = policies.policy("detector")
    assert in_force is not None and in_force.candidate is not None and in_force.candidate.canary_percent == 10
    assert policies.state("detector").version == "5" and valid() == 1

    policies._changed(docs(detector=(_doc(canary_percent=101), 6)))
    state = policies.state("detector")
    assert state.policy == in_force and state.version == "5" and state.refused_version == "6"
    assert "canary_percent" in (state.refused_reason or "") and valid() == 0

    policies._changed(docs())
    assert policies.policy("detector") is None and policies.state("detector").version == "none" and valid() == 1
