"""Calling one replica set under its policy: pick, deadline, retry, hedge, eject — and the one place
where a replica's grpc.RpcError becomes the gateway's own outcome."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshserve import telemetry
from meshserve.errors import (
    DeadlineExpired,
    FailedPrecondition,
    InvalidInput,
    MeshError,
    NotReady,
    Overloaded,
)
from meshserve.gateway.balancer import Replica, ReplicaSet
from meshserve.v1 import prediction_pb2

_TRACER = trace.get_tracer("meshserve.gateway")

# Failures that say something about the replica (not the request): they count toward ejection.
_REPLICA_FAULTS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


class UpstreamFailed(MeshError):
    """A replica failed in a way the gateway cannot repair (INTERNAL to our caller)."""


def translate(stage: str, error: grpc.aio.AioRpcError) -> MeshError:
    """A replica's status → the gateway's error tree, message prefixed with the stage."""
    code, details = error.code(), error.details() or ""
    message = f"{stage}: {details}" if details else f"{stage}: {code.name}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(message)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExpired(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return NotReady(message)
    return UpstreamFailed(message)


@dataclass
class CallStats:
    """What happened across the attempts of one logical call (for metrics and spans)."""

    attempts: int = 0
    retries: int = 0
    hedges: int = 0
    ejections: int = 0
    replica: str = ""
    errors: list[str] = field(default_factory=list)


class ServiceCaller:
    """Predict on one replica set under its policy, within a caller's absolute deadline."""

    def __init__(self, replicas: ReplicaSet, stage: str):
        self.replicas = replicas
        self.stage = stage
        self.budget = replicas.budget

    async def predict(
        self,
        request: prediction_pb2.PredictRequest,
        deadline: float,
    ) -> tuple[prediction_pb2.PredictResponse, CallStats]:
        """The first good answer from a replica, or the error the caller should see.

        `deadline` is time.monotonic() based; each attempt gets only what is left of it.
        """
        policy = self.replicas.policy
        stats = CallStats()
        self.budget.on_call()
        if policy.hedge_after_ms is None:
            return await self._one_at_a_time(request, deadline, stats)
        tried: set[str] = set()
        running: dict[asyncio.Task[prediction_pb2.PredictResponse], Replica] = {}
        last_error: MeshError | None = None
        hedge_delay = policy.hedge_after_ms / 1000.0 if policy.hedge_after_ms else None

        def launch() -> bool:
            replica = self.replicas.pick(tried)
            if replica is None:
                return False
            tried.add(replica.id)
            stats.attempts += 1
            remaining = deadline - time.monotonic()
            attempt = self._attempt(replica, request, remaining)
            task = asyncio.ensure_future(attempt)
            running[task] = replica
            return True

        try:
            if deadline - time.monotonic() <= 0:
                raise DeadlineExpired(f"{self.stage}: no time left before calling it")
            if not launch():
                raise NotReady(f"{self.stage}: no passing replica of {self.replicas.name}")
            while running:
                remaining = deadline - time.monotonic()
                wait_for = remaining
                may_hedge = (hedge_delay is not None and len(running) == 1
                             and stats.attempts < policy.max_attempts)  # fmt: skip
                if may_hedge:
                    assert hedge_delay is not None
                    wait_for = min(remaining, hedge_delay)
                done, _ = await asyncio.wait(running, timeout=max(wait_for, 0),
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if not done:
                    if deadline - time.monotonic() <= 0:
                        raise DeadlineExpired(f"{self.stage}: deadline exceeded")
                    if may_hedge and self.budget.try_spend() and launch():
                        stats.hedges += 1
                        hedge_delay = None  # one hedge per call
                    elif may_hedge:
                        hedge_delay = None
                    continue
                for task in done:
                    replica = running.pop(task)
                    error = task.exception()
                    if error is None:
                        self.replicas.succeeded(replica)
                        stats.replica = replica.id
                        return task.result(), stats
                    if not isinstance(error, grpc.aio.AioRpcError):
                        raise error
                    code = error.code()
                    stats.errors.append(f"{replica.id}: {code.name}")
                    if code in _REPLICA_FAULTS and self.replicas.failed(replica):
                        stats.ejections += 1
                    last_error = translate(self.stage, error)
                    if code not in policy.retry_on:
                        raise last_error
                if not running:
                    if stats.attempts >= policy.max_attempts or deadline - time.monotonic() <= 0:
                        break
                    if not self.budget.try_spend():
                        break
                    if not launch():
                        break
                    stats.retries += 1
            assert last_error is not None
            raise last_error
        finally:
            for task in running:
                task.cancel()

    async def _one_at_a_time(
        self, request: prediction_pb2.PredictRequest, deadline: float, stats: CallStats
    ) -> tuple[prediction_pb2.PredictResponse, CallStats]:
        """predict() without hedging: the attempts run in this task one after another (no task, no
        wait per call); each attempt's gRPC deadline is what is left of the caller's."""
        policy = self.replicas.policy
        if deadline - time.monotonic() <= 0:
            raise DeadlineExpired(f"{self.stage}: no time left before calling it")
        tried: set[str] = set()
        last_error: MeshError | None = None
        while True:
            replica = self.replicas.pick(tried)
            if replica is None:
                if last_error is None:
                    raise NotReady(f"{self.stage}: no passing replica of {self.replicas.name}")
                raise last_error
            tried.add(replica.id)
            stats.attempts += 1
            try:
                response = await self._attempt(replica, request, deadline - time.monotonic())
            except grpc.aio.AioRpcError as error:
                code = error.code()
                stats.errors.append(f"{replica.id}: {code.name}")
                if code in _REPLICA_FAULTS and self.replicas.failed(replica):
                    stats.ejections += 1
                last_error = translate(self.stage, error)
                if code not in policy.retry_on or stats.attempts >= policy.max_attempts:
                    raise last_error from None
                if deadline - time.monotonic() <= 0 or not self.budget.try_spend():
                    raise last_error from None
                stats.retries += 1
                continue
            self.replicas.succeeded(replica)
            stats.replica = replica.id
            return response, stats

    async def _attempt(
        self,
        replica: Replica,
        request: prediction_pb2.PredictRequest,
        timeout: float,
    ) -> prediction_pb2.PredictResponse:
        if not telemetry.exporting():  # no span to record: the caller's trace context still goes out
            return await self._send(replica, request, timeout)
        with _TRACER.start_as_current_span(
            f"{self.stage} → {replica.instance.target}", kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": "meshserve.v1.PredictionService",
                        "rpc.method": "Predict", "replica": replica.id},
        ) as span:  # fmt: skip
            try:
                return await self._send(replica, request, timeout)
            except grpc.aio.AioRpcError as error:
                span.set_status(Status(StatusCode.ERROR, error.code().name))
                raise

    @staticmethod
    async def _send(
        replica: Replica, request: prediction_pb2.PredictRequest, timeout: float
    ) -> prediction_pb2.PredictResponse:
        replica.outstanding += 1
        replica.calls += 1
        try:
            metadata = telemetry.inject_metadata()
            return await replica.stub.Predict(request, timeout=max(timeout, 0.001), metadata=metadata)
        finally:
            replica.outstanding -= 1
