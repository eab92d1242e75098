"""Unit tests of the dev agent's state: indexes, thresholds, wake-ups, reaping, snapshots."""

from __future__ import annotations

import asyncio
import time

import pytest

from meshserve.registry.dev.notify import block_until_changed, blocking_timeout
from meshserve.registry.dev.schema import CheckDef, ServiceDef, parse_service
from meshserve.registry.dev.state import INDEX_RESERVE, DevState, NodeInfo, NotFoundError


def new_state(**kwargs: float) -> DevState:
    return DevState(NodeInfo("node-id", "node", "127.0.0.1"), **kwargs)


def register(state: DevState, body: dict) -> None:
    service, checks = parse_service(body)
    state.register_service(service, checks)


def test_thresholds_count_consecutive_results() -> None:
    state = new_state()
    register(state, {"Name": "w", "Check": {"HTTP": "http://x/", "Interval": "1s",
                                            "SuccessBeforePassing": 2, "FailuresBeforeWarning": 1,
                                            "FailuresBeforeCritical": 3}})
    check = state.checks["service:w"]
    state.record_result("service:w", "passing", "ok")
    assert check.status == "passing"  # like Consul, the first result applies at once
    state.record_result("service:w", "critical", "no")
    assert check.status == "warning"
    state.record_result("service:w", "passing", "ok")
    assert check.status == "warning"  # one success is not enough any more
    state.record_result("service:w", "critical", "no")
    state.record_result("service:w", "passing", "ok")
    assert check.status == "warning"  # the failure reset the run of successes
    state.record_result("service:w", "passing", "ok")
    assert check.status == "passing"
    for _ in range(2):
        state.record_result("service:w", "critical", "no")
        assert check.status == "warning"
    state.record_result("service:w", "critical", "no")
    assert check.status == "critical"


def test_first_failure_of_a_new_check_is_critical_at_once() -> None:
    state = new_state()
    register(state, {"Name": "w", "Check": {"GRPC": "h:1", "Interval": "1s",
                                            "FailuresBeforeCritical": 3}})
    state.record_result("service:w", "critical", "down")
    assert state.checks["service:w"].output == "down"
    assert state.checks["service:w"].status == "critical"


def test_health_index_moves_on_check_output_and_extinction() -> None:
    state = new_state()
    register(state, {"Name": "w", "ID": "w1", "Check": {"TTL": "5s"}})
    first, _ = state.health("w")
    state.update_ttl("service:w1", "critical", "")  # no change: no new index
    assert state.health("w")[0] == first
    state.update_ttl("service:w1", "critical", "new output")
    second, _ = state.health("w")
    assert second > first
    register(state, {"Name": "other", "Check": {"TTL": "5s"}})
    assert state.health("w")[0] == second  # another service does not move this one
    state.deregister_service("w1")
    gone, entries = state.health("w")
    assert entries == [] and gone > second
    assert state.health("never-existed")[0] >= 1
    with pytest.raises(NotFoundError):
        state.deregister_service("w1")


def test_kv_indexes_include_deletes_under_the_prefix() -> None:
    state = new_state()
    state.kv_put("a/1", b"x", None, None)
    state.kv_put("b/1", b"y", None, None)
    index_a, _ = state.kv_list("a/")
    state.kv_delete("a/1", recurse=False, cas=None)
    after, entries = state.kv_list("a/")
    assert entries == [] and after > index_a
    state.kv_put("b/2", b"z", None, None)
    assert state.kv_list("a/")[0] == after  # other prefixes do not move it


async def test_blocking_wakes_on_change_and_times_out_otherwise() -> None:
    state = new_state()
    register(state, {"Name": "w", "ID": "w1", "Check": {"TTL": "5s"}})
    index, _ = state.health("w")

    async def later() -> None:
        await asyncio.sleep(0.05)
        state.update_ttl("service:w1", "passing", "")

    start = time.monotonic()
    task = asyncio.create_task(later())
    new_index = await block_until_changed(
        state.notifier, lambda: state.health_index("w"), index, 5.0, topics=(("svc", "w"),))
    await task
    assert new_index > index and state.health("w")[1][0].checks[-1].status == "passing"
    assert time.monotonic() - start < 1.0
    assert state.notifier.waiting() == 0

    start = time.monotonic()
    same = await block_until_changed(
        state.notifier, lambda: state.health_index("w"), new_index, 0.2, topics=(("svc", "w"),))
    assert same == new_index and 0.2 <= time.monotonic() - start < 0.2 + 0.2 / 16 + 0.5
    assert state.notifier.waiting() == 0


def test_blocking_timeout_follows_consul_defaults() -> None:
    assert 300 <= blocking_timeout(None) <= 300 * 17 / 16
    assert 300 <= blocking_timeout(0) <= 300 * 17 / 16
    assert 600 <= blocking_timeout(3600) <= 600 * 17 / 16
    assert 2 <= blocking_timeout(2) <= 2 * 17 / 16


def test_reaper_honours_the_minimum_and_only_checks_with_a_timeout() -> None:
    state = new_state(min_deregister_after=0.0)
    register(state, {"Name": "w", "ID": "doomed",
                     "Check": {"TTL": "5s", "DeregisterCriticalServiceAfter": "10ms"}})
    register(state, {"Name": "w", "ID": "kept", "Check": {"TTL": "5s"}})
    time.sleep(0.02)
    assert state.reap() == ["doomed"]
    assert set(state.services) == {"kept"}
    slow = new_state(min_deregister_after=60.0)
    register(slow, {"Name": "w", "Check": {"TTL": "5s", "DeregisterCriticalServiceAfter": "10ms"}})
    time.sleep(0.02)
    assert slow.reap() == []


def test_snapshot_round_trip_resumes_above_every_index_handed_out() -> None:
    state = new_state()
    register(state, {"Name": "w", "ID": "w1", "Meta": {"shard": "1"}, "Tags": ["t"],
                     "Checks": [{"TTL": "5s"}, {"GRPC": "h:1", "Interval": "1s"}]})
    state.update_ttl("service:w1:1", "passing", "fine")
    state.record_result("service:w1:2", "passing", "grpc ok")
    state.kv_put("k", b"\x00v", 9, None)
    state.kv_delete("k", False, None)
    state.kv_put("k2", None, None, None)
    snap = state.snapshot()
    restored = new_state()
    restored.restore(snap)
    assert restored.index == state.index + INDEX_RESERVE
    assert restored.services["w1"].definition == state.services["w1"].definition
    assert restored.checks["service:w1:1"].status == "passing"  # TTL state survives
    assert restored.checks["service:w1:2"].status == "critical"  # probed checks start over
    assert restored.kv["k2"].value is None and "k" in restored.tombstones
    assert restored.health("w")[0] == state.health("w")[0]


def test_reregistering_keeps_a_known_check_status() -> None:
    state = new_state()
    body = {"Name": "w", "ID": "w1", "Check": {"TTL": "5s"}}
    register(state, body)
    state.update_ttl("service:w1", "passing", "")
    register(state, body)
    assert state.checks["service:w1"].status == "passing"
    state.register_service(ServiceDef("w1", "w"), [], replace_existing_checks=True)
    assert "service:w1" not in state.checks
    state.register_check(CheckDef(check_id="node-check", name="n", kind="ttl", ttl=5.0))
    assert [c.check_id for c in state.health("w")[1][0].checks] == ["serfHealth", "node-check"]


def test_tombstones_are_bounded_without_indexes_going_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshserve.registry.dev import state as dev_state

    monkeypatch.setattr(dev_state, "MAX_TOMBSTONES", 10)
    state = new_state()
    state.kv_put("p/keep", b"x", None, None)
    seen = []
    for i in range(30):
        state.kv_put(f"p/{i}", b"x", None, None)
        state.kv_delete(f"p/{i}", recurse=False, cas=None)
        seen.append(state.kv_list("p/")[0])
    assert len(state.tombstones) <= 10
    assert seen == sorted(seen) and len(set(seen)) == 30


def test_identical_reregistration_changes_nothing() -> None:
    state = new_state()
    body = {"Name": "w", "ID": "w1", "Meta": {"a": "1"}, "Check": {"TTL": "5s"}}
    register(state, body)
    state.update_ttl("service:w1", "passing", "ok")
    index = state.health("w")[0]
    register(state, body)
    assert state.health("w")[0] == index
    register(state, {**body, "Meta": {"a": "2"}})
    assert state.health("w")[0] > index
    assert state.checks["service:w1"].status == "passing"  # a changed service keeps its checks
