"""Replicas of one service (or one shard): a persistent channel each, least-outstanding choice,
outlier ejection. Channels of replicas that leave are closed once their calls have finished."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import grpc

from meshserve.gateway.policy import CallPolicy, RetryBudget
from meshserve.registry.instances import Instance
from meshserve.rpc.channel_options import client_options
from meshserve.v1 import prediction_pb2_grpc

log = logging.getLogger(__name__)

ChannelFactory = Callable[[str], grpc.aio.Channel]
CLOSE_GRACE_S = 30.0


@runtime_checkable
class InstanceChannels(Protocol):
    """A channel factory that opens a channel for a registered instance (mTLS checks the service it names)."""

    def __call__(self, target: str) -> grpc.aio.Channel: ...

    def for_instance(self, instance: Instance) -> grpc.aio.Channel: ...

    def track(self, replicas: ReplicaSet) -> None:
        """Remember `replicas`, to reopen() its channels when the client certificate is renewed."""


def insecure_channel(target: str, max_message_bytes: int = 16 * 1024 * 1024) -> grpc.aio.Channel:
    options = [
        *client_options(max_message_bytes),
        ("grpc.enable_retries", 0),  # retries are the policy's, not the channel's
    ]
    return grpc.aio.insecure_channel(target, options=options)


@dataclass(eq=False)
class Replica:
    instance: Instance
    channel: grpc.aio.Channel
    stub: prediction_pb2_grpc.PredictionServiceStub
    outstanding: int = 0
    consecutive_failures: int = 0
    times_ejected: int = 0
    ejected_until: float = 0.0
    calls: int = field(default=0)

    @property
    def id(self) -> str:
        return self.instance.id

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now


class ReplicaSet:
    """The passing replicas of one routing target, kept in step with discovery."""

    def __init__(self, name: str, policy: CallPolicy, channel_factory: ChannelFactory = insecure_channel):
        self.name = name
        self.policy = policy
        self._factory = channel_factory
        self._replicas: dict[str, Replica] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.ejections = 0
        self.budget = RetryBudget.for_policy(policy)  # shared by every call to this set
        if isinstance(channel_factory, InstanceChannels):
            channel_factory.track(self)

    def __len__(self) -> int:
        return len(self._replicas)

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def update(self, instances: Iterable[Instance]) -> None:
        """Make the set equal `instances`: open channels for newcomers, close departed ones."""
        wanted = {i.id: i for i in instances}
        for rid in list(self._replicas):
            old = self._replicas[rid]
            if rid not in wanted or wanted[rid].target != old.instance.target:
                del self._replicas[rid]
                self._close_later(old)
        for rid, instance in wanted.items():
            current = self._replicas.get(rid)
            if current is None:
                channel = self._open(instance)
                stub = prediction_pb2_grpc.PredictionServiceStub(channel)
                self._replicas[rid] = Replica(instance, channel, stub)
            elif current.instance != instance:
                current.instance = instance  # meta changed, same address: keep the channel

    def _open(self, instance: Instance) -> grpc.aio.Channel:
        if isinstance(self._factory, InstanceChannels):
            return self._factory.for_instance(instance)
        return self._factory(instance.target)

    def reopen(self) -> None:
        """A new channel for every replica (a channel keeps the client certificate it was opened with, also for
        its reconnects); calls in flight finish on the old ones, which close after them."""
        for rid, old in list(self._replicas.items()):
            channel = self._open(old.instance)
            self._replicas[rid] = replace(old, channel=channel, stub=prediction_pb2_grpc.PredictionServiceStub(channel),
                                          outstanding=0)  # fmt: skip
            self._close_later(old)

    def _close_later(self, replica: Replica) -> None:
        async def close() -> None:
            # Calls in flight finish (bounded by their deadlines); then the channel goes.
            deadline = time.monotonic() + CLOSE_GRACE_S
            while replica.outstanding and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await replica.channel.close()

        try:
            task = asyncio.get_running_loop().create_task(close())
        except RuntimeError:
            return  # no loop (shutdown): nothing to wait for
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> Replica | None:
        """Power of two choices on outstanding calls among replicas not ejected nor excluded.

        When every candidate is ejected, the one whose ejection ends first is used anyway:
        ejection protects against outliers, it must not take a whole service down.
        """
        now = time.monotonic()
        candidates = [r for r in self._replicas.values() if r.id not in exclude]
        if not candidates:
            return None
        healthy = [r for r in candidates if not r.ejected(now)]
        if not healthy:
            return min(candidates, key=lambda r: r.ejected_until)
        if len(healthy) == 1:
            return healthy[0]
        a, b = random.sample(healthy, 2)
        return a if a.outstanding <= b.outstanding else b

    def succeeded(self, replica: Replica) -> None:
        replica.consecutive_failures = 0
        if not replica.ejected(time.monotonic()):
            replica.times_ejected = 0

    def failed(self, replica: Replica) -> bool:
        """Count a failure that says the replica itself is unwell; True if it was ejected now."""
        replica.consecutive_failures += 1
        if replica.consecutive_failures < self.policy.eject_after_failures:
            return False
        now = time.monotonic()
        ejected_now = sum(1 for r in self._replicas.values() if r.ejected(now))
        if (ejected_now + 1) > self.policy.max_ejected_fraction * len(self._replicas) and ejected_now > 0:
            return False
        replica.times_ejected += 1
        replica.consecutive_failures = 0
        replica.ejected_until = now + self.policy.ejection_s(replica.times_ejected)
        self.ejections += 1
        log.warning("%s: ejected %s for %.1fs after %d consecutive failures", self.name, replica.id,
                    replica.ejected_until - now, self.policy.eject_after_failures)  # fmt: skip
        return True

    async def close(self) -> None:
        for replica in self._replicas.values():
            await replica.channel.close()
        self._replicas.clear()
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
