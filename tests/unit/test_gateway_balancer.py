"""Outlier ejection in a real ReplicaSet and the retry budget, on a clock the test moves: ejections
are capped at a fraction of the set, expire after their time (doubling while a replica keeps failing),
and retries spend a budget that calls and time refill up to a cap."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from meshserve.gateway import balancer, policy
from meshserve.gateway.balancer import ReplicaSet
from meshserve.gateway.policy import CallPolicy, RetryBudget
from meshserve.registry.instances import Instance


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock()
    for module in (balancer, policy):
        monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=fake.monotonic))
    yield fake


def replica_set(n: int, **settings: object) -> ReplicaSet:
    replicas = ReplicaSet("test", CallPolicy("meshserve-test", **settings))  # type: ignore[arg-type]
    # channels to ports nothing listens on: grpc connects lazily, and nothing here calls them
    replicas.update([Instance(id=f"r{i}", name="meshserve-test", address="127.0.0.1", port=1 + i) for i in range(n)])
    return replicas


def fail(replicas: ReplicaSet, rid: str, times: int) -> bool:
    [replica] = [r for r in replicas.replicas if r.id == rid]
    return [replicas.failed(replica) for _ in range(times)][-1]


async def test_ejection_never_takes_more_than_the_fraction_of_a_set(clock: Clock) -> None:
    replicas = replica_set(4, eject_after_failures=3, max_ejected_fraction=0.5)
    try:
        assert not fail(replicas, "r0", 2)  # below the threshold
        assert fail(replicas, "r0", 1)
        assert fail(replicas, "r1", 3)  # 2 of 4: at the cap
        assert not fail(replicas, "r2", 3)  # a third would pass it
        assert replicas.ejections == 2
        picked = {replicas.pick().id for _ in range(200)}  # type: ignore[union-attr]
        assert picked == {"r2", "r3"}
    finally:
        await replicas.close()


async def test_a_single_replica_can_be_ejected_but_is_still_used_when_nothing_else_is_left(clock: Clock) -> None:
    replicas = replica_set(1, eject_after_failures=1)
    try:
        assert fail(replicas, "r0", 1)
        only = replicas.pick()
        assert only is not None and only.id == "r0" and only.ejected(clock.now)
    finally:
        await replicas.close()


async def test_ejection_expires_and_doubles_while_the_replica_keeps_failing(clock: Clock) -> None:
    replicas = replica_set(2, eject_after_failures=1, base_ejection_s=1.0, max_ejection_s=4.0)
    [r0] = [r for r in replicas.replicas if r.id == "r0"]
    try:
        durations = []
        for _ in range(4):
            assert fail(replicas, "r0", 1)
            durations.append(r0.ejected_until - clock.now)
            clock.now += durations[-1] - 0.01
            assert r0.ejected(clock.now) and {replicas.pick().id for _ in range(50)} == {"r1"}  # type: ignore[union-attr]
            clock.now += 0.02  # expired: back in the rotation
            assert not r0.ejected(clock.now) and "r0" in {replicas.pick().id for _ in range(200)}  # type: ignore[union-attr]
        assert durations == [1.0, 2.0, 4.0, 4.0]  # doubling, capped at max_ejection_s
        replicas.succeeded(r0)  # a success after it expired: the next ejection starts short again
        assert fail(replicas, "r0", 1) and r0.ejected_until - clock.now == 1.0
    finally:
        await replicas.close()


def test_retry_budget_spends_what_calls_and_time_put_in_up_to_its_cap(clock: Clock) -> None:
    # (a ratio that binary floats add exactly)
    budget = RetryBudget.for_policy(CallPolicy("meshserve-test", retry_budget_ratio=0.25, retry_budget_floor_per_s=5.0))
    assert sum(budget.try_spend() for _ in range(30)) == 10  # what it starts with
    for _ in range(20):
        budget.on_call()  # 20 calls × 0.25
    assert sum(budget.try_spend() for _ in range(30)) == 5
    clock.now += 1.0  # the floor: 5 per second
    assert sum(budget.try_spend() for _ in range(30)) == 5
    clock.now += 3600  # a long quiet spell saves up no more than the cap
    assert sum(budget.try_spend() for _ in range(100)) == 20


def test_a_budget_without_ratio_or_floor_allows_no_more_than_its_start(clock: Clock) -> None:
    budget = RetryBudget.for_policy(CallPolicy("meshserve-test", retry_budget_ratio=0.0, retry_budget_floor_per_s=0.0))
    clock.now += 60
    assert sum(budget.try_spend() for _ in range(30)) == 10
