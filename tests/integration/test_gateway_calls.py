"""The gateway's calling policy against real identity servers: balancing, retry on another replica,
ejection, hedging, deadlines — each outcome decided in one place (gateway/calls.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest

from meshserve.errors import DeadlineExpired, InvalidInput, NotReady
from meshserve.gateway.balancer import ReplicaSet
from meshserve.gateway.calls import ServiceCaller
from meshserve.gateway.policy import CallPolicy
from meshserve.registry.instances import Instance
from meshserve.v1 import prediction_pb2
from meshserve.wire import tensors
from tests.integration.identity_server import IdentityServer, start_identity
from tests.support import ManagedProcess


def instance(server: IdentityServer, name: str) -> Instance:
    return Instance(id=name, name="meshserve-identity", address="127.0.0.1", port=server.port)


def request(rows: int = 1) -> prediction_pb2.PredictRequest:
    req = prediction_pb2.PredictRequest()
    req.inputs["x"].CopyFrom(tensors.tensor_from(np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)))
    return req


def caller(servers: dict[str, IdentityServer], **policy: object) -> ServiceCaller:
    replicas = ReplicaSet("identity", CallPolicy("meshserve-identity", **policy))  # type: ignore[arg-type]
    replicas.update([instance(s, name) for name, s in servers.items()])
    return ServiceCaller(replicas, "identity")


async def test_calls_spread_over_replicas_and_return_the_answer(spawn: Callable[..., ManagedProcess]) -> None:
    servers = {"a": start_identity(spawn), "b": start_identity(spawn)}
    call = caller(servers)
    try:
        for _ in range(40):
            reply, stats = await call.predict(request(2), time.monotonic() + 5)
            np.testing.assert_array_equal(tensors.array_from(reply.outputs["y"]),
                                          np.arange(8, dtype=np.float32).reshape(2, 4))  # fmt: skip
            assert stats.attempts == 1
        counts = sorted(r.calls for r in call.replicas.replicas)
        assert counts[0] >= 5, counts  # both replicas take a share
    finally:
        await call.replicas.close()


async def test_a_killed_replica_costs_no_failed_call_and_is_ejected(
    spawn: Callable[..., ManagedProcess],
) -> None:
    servers = {"a": start_identity(spawn), "b": start_identity(spawn)}
    call = caller(servers, eject_after_failures=2, base_ejection_s=30.0)
    try:
        await call.predict(request(), time.monotonic() + 5)
        servers["b"].proc.kill()
        outcomes = []
        for _ in range(30):
            _, stats = await call.predict(request(), time.monotonic() + 5)
            outcomes.append(stats)
        assert all(s.replica == "a" for s in outcomes)
        assert sum(s.retries for s in outcomes) >= 2  # b failed, the calls went to a
        [b] = [r for r in call.replicas.replicas if r.id == "b"]
        assert b.ejected(time.monotonic())
        assert sum(s.ejections for s in outcomes) == 1
    finally:
        await call.replicas.close()


async def test_no_replica_left_is_unavailable_not_a_hang(spawn: Callable[..., ManagedProcess]) -> None:
    servers = {"a": start_identity(spawn)}
    call = caller(servers)
    servers["a"].proc.kill()
    try:
        started = time.monotonic()
        with pytest.raises(NotReady, match="identity"):
            await call.predict(request(), time.monotonic() + 5)
        assert time.monotonic() - started < 4.0  # refused, not waited out (5 s deadline)
        call.replicas.update([])
        with pytest.raises(NotReady, match="no passing replica"):
            await call.predict(request(), time.monotonic() + 5)
    finally:
        await call.replicas.close()


async def test_overloaded_replica_sends_the_call_to_another(spawn: Callable[..., ManagedProcess]) -> None:
    servers = {"busy": start_identity(spawn, "--max-inflight", "1", "--delay-ms", "20000"),
               "idle": start_identity(spawn)}  # fmt: skip
    call = caller(servers)
    try:
        busy = next(r for r in call.replicas.replicas if r.id == "busy")
        hog = asyncio.ensure_future(busy.stub.Predict(request(), timeout=30))
        # wait until the hog holds busy's only slot (its in-flight gauge says so)
        for _ in range(400):
            if servers["busy"].metric("meshserve_server_inflight") >= 1:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the hog never filled the busy replica")
        results = [await call.predict(request(), time.monotonic() + 5) for _ in range(10)]
        assert all(stats.replica == "idle" for _, stats in results)
        assert any(stats.retries for _, stats in results)  # some first picked busy and were refused
        hog.cancel()
    finally:
        await call.replicas.close()


async def test_hedge_answers_from_the_fast_replica(spawn: Callable[..., ManagedProcess]) -> None:
    servers = {"slow": start_identity(spawn, "--delay-ms", "3000"), "fast": start_identity(spawn)}
    call = caller(servers, hedge_after_ms=30)
    try:
        slow = next(r for r in call.replicas.replicas if r.id == "slow")
        for _ in range(5):
            slow.outstanding = -1000  # make the balancer pick the slow one first
            started = time.monotonic()
            _, stats = await call.predict(request(), time.monotonic() + 5)
            slow.outstanding += 1000
            assert stats.replica == "fast" and stats.hedges == 1
            assert time.monotonic() - started < 1.5  # the slow one would take 3 s; generous for a loaded machine
    finally:
        await call.replicas.close()


async def test_deadline_bounds_the_call(spawn: Callable[..., ManagedProcess]) -> None:
    servers = {"slow": start_identity(spawn, "--delay-ms", "5000")}
    call = caller(servers)
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExpired):
            await call.predict(request(), time.monotonic() + 0.05)
        assert time.monotonic() - started < 2.0  # 50 ms asked, the replica takes 5 s
        with pytest.raises(DeadlineExpired, match="no time left"):
            await call.predict(request(), time.monotonic() - 0.01)
    finally:
        await call.replicas.close()


async def test_bad_request_is_not_retried_and_keeps_its_status(spawn: Callable[..., ManagedProcess]) -> None:
    servers = {"a": start_identity(spawn), "b": start_identity(spawn)}
    call = caller(servers)
    bad = prediction_pb2.PredictRequest()
    bad.inputs["x"].CopyFrom(tensors.tensor_from(np.zeros((1, 4), dtype=np.float64)))
    try:
        with pytest.raises(InvalidInput, match=r"identity: inputs\['x'\].dtype"):
            await call.predict(bad, time.monotonic() + 5)
        assert sum(r.calls for r in call.replicas.replicas) == 1
    finally:
        await call.replicas.close()


async def test_retries_stop_when_the_retry_budget_is_spent(spawn: Callable[..., ManagedProcess]) -> None:
    servers = {"live": start_identity(spawn), **{f"dead-{i}": start_identity(spawn) for i in range(3)}}
    for name in ("dead-0", "dead-1", "dead-2"):
        servers[name].proc.kill()  # refused: UNAVAILABLE, retryable
    # Nothing refills this budget (no ratio, no floor) and no replica is ejected: only the budget
    # can stop the retries.
    call = caller(servers, max_attempts=4, retry_budget_ratio=0.0, retry_budget_floor_per_s=0.0,
                  eject_after_failures=1000)  # fmt: skip
    failed = 0
    try:
        for _ in range(60):
            try:
                _, stats = await call.predict(request(), time.monotonic() + 5)
            except NotReady:
                failed += 1
            else:
                assert stats.replica == "live"
        attempts = sum(r.calls for r in call.replicas.replicas)
    finally:
        await call.replicas.close()
    assert attempts - 60 == 10  # retries: the budget's starting tokens, and not one more
    assert failed >= 1  # once spent, a call whose first pick is dead fails instead of retrying
