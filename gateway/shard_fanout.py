"""A photo search's shard fan-out: the shards grouped by the indexer process that serves them, one call
per process naming its shards, and a shard that failed asked again of another replica that has it.

The registry holds one registration per shard, so each shard keeps its own replica set (coverage,
version sets, ejection and the retry budget stay per shard); replicas of different shards at one
address are one process, and one call carries all the shards it is asked for there.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshserve import telemetry
from meshserve.gateway import model_wire
from meshserve.gateway.balancer import Replica
from meshserve.gateway.calls import CallStats
from meshserve.gateway.model_wire import ShardFailure
from meshserve.gateway.routes import ShardRoute
from meshserve.v1 import prediction_pb2

log = logging.getLogger(__name__)
_TRACER = trace.get_tracer("meshserve.gateway")

# Failures that say something about the replica (not the request): they count toward ejection.
_REPLICA_FAULTS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
# A process that no longer serves a shard it is registered for answers NOT_FOUND for it: ask another.
_ASK_ELSEWHERE = frozenset({grpc.StatusCode.NOT_FOUND})
# What a missing shard's reason says (the gateway's error names, as the metrics label them).
_REASONS = {
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidInput",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExpired",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "Overloaded",
    grpc.StatusCode.UNAVAILABLE: "NotReady",
    grpc.StatusCode.CANCELLED: "NotReady",
    grpc.StatusCode.NOT_FOUND: "NotFound",
}


@dataclass
class ShardAnswer:
    shard: str
    ids: np.ndarray | None = None
    scores: np.ndarray | None = None
    reason: str = ""


@dataclass(frozen=True)
class Leg:
    """One call of a fan-out round: one indexer process and, per shard asked of it, that shard's
    route and its replica there."""

    target: str
    picks: tuple[tuple[ShardRoute, Replica], ...]

    @property
    def shards(self) -> tuple[str, ...]:
        return tuple(route.shard for route, _ in self.picks)


def plan(shards: Sequence[ShardRoute], tried: dict[str, set[str]] | None = None,
         now: float | None = None) -> tuple[list[Leg], list[ShardRoute]]:  # fmt: skip
    """Group `shards` into as few calls as their replicas allow (greedy: the process serving the most
    of the shards left takes all of them; ties go to the less busy, then at random). A shard's
    ejected replicas are skipped unless it has no other, and `tried[shard]` holds targets it may not
    use again. Returns the legs and the shards no replica is left for."""
    tried = tried or {}
    now = time.monotonic() if now is None else now
    options: dict[str, dict[str, Replica]] = {}
    routes: dict[str, ShardRoute] = {}
    stranded: list[ShardRoute] = []
    for route in shards:
        excluded = tried.get(route.shard, ())
        candidates = [r for r in route.replicas.replicas if r.instance.target not in excluded]
        if not candidates:
            stranded.append(route)
            continue
        healthy = [r for r in candidates if not r.ejected(now)]
        if not healthy:  # ejection guards against outliers; it must not take a shard away
            healthy = [min(candidates, key=lambda r: r.ejected_until)]
        options[route.shard] = {r.instance.target: r for r in healthy}
        routes[route.shard] = route
    legs: list[Leg] = []
    while options:
        served: dict[str, list[str]] = defaultdict(list)  # target → shards left that it can answer
        for shard, by_target in options.items():
            for target in by_target:
                served[target].append(shard)
        target = max(served, key=lambda t: (len(served[t]), -_busy(options, served[t], t), random.random()))
        legs.append(Leg(target, tuple((routes[s], options.pop(s)[target]) for s in served[target])))
    return legs, stranded


def _busy(options: dict[str, dict[str, Replica]], shards: list[str], target: str) -> int:
    return max(options[shard][target].outstanding for shard in shards)


@dataclass
class _Progress:
    """What one shard's attempts came to so far."""

    attempts: int = 0
    tried: set[str] = field(default_factory=set)
    reason: str = ""


class ShardFanOut:
    """The fan-out of one search: rounds of grouped calls until every shard answered or gave up."""

    def __init__(self, vectors: np.ndarray, top_k: int, embedder_version: str, deadline: float):
        self.vectors = vectors
        self.top_k = top_k
        self.embedder_version = embedder_version
        self.deadline = deadline
        self.stats = CallStats()

    async def run(self, shards: Sequence[ShardRoute]) -> list[ShardAnswer]:
        answers: dict[str, ShardAnswer] = {}
        progress: dict[str, _Progress] = {}
        pending: list[ShardRoute] = []
        for route in shards:
            if not len(route.replicas):
                answers[route.shard] = ShardAnswer(route.shard, reason="no passing replica")
            else:
                route.replicas.budget.on_call()
                progress[route.shard] = _Progress()
                pending.append(route)
        while pending:
            if self.deadline - time.monotonic() <= 0:
                for route in pending:
                    answers[route.shard] = ShardAnswer(route.shard, reason="DeadlineExpired")
                break
            legs, stranded = plan(pending, {s: p.tried for s, p in progress.items()})
            for route in stranded:
                answers[route.shard] = ShardAnswer(route.shard, reason=progress[route.shard].reason or "NotReady")
            for leg in legs:
                for route, _ in leg.picks:
                    progress[route.shard].attempts += 1
                    progress[route.shard].tried.add(leg.target)
            if len(legs) == 1:  # the common case with one indexer process: no task to make
                outcomes = [await self._call(legs[0])]
            else:
                outcomes = await asyncio.gather(*(self._call(leg) for leg in legs))
            pending = []
            for leg, by_shard in zip(legs, outcomes, strict=True):
                for route, replica in leg.picks:
                    outcome = by_shard[route.shard]
                    if isinstance(outcome, ShardFailure):
                        if self._retry(route, replica, outcome, progress[route.shard]):
                            pending.append(route)
                        else:
                            answers[route.shard] = ShardAnswer(route.shard, reason=progress[route.shard].reason)
                    else:
                        route.replicas.succeeded(replica)
                        answers[route.shard] = ShardAnswer(route.shard, outcome[0], outcome[1])
        return [answers[route.shard] for route in shards]

    def _retry(self, route: ShardRoute, replica: Replica, failure: ShardFailure, progress: _Progress) -> bool:
        """Count one shard's failure on `replica`; True when it should be asked of another replica."""
        log.debug("shard %s: %s", route.shard, failure.message)
        self.stats.errors.append(f"{replica.id}: {failure.code.name}")
        if failure.code in _REPLICA_FAULTS and route.replicas.failed(replica):
            self.stats.ejections += 1
        progress.reason = _REASONS.get(failure.code, "UpstreamFailed")
        policy = route.replicas.policy
        if failure.code not in policy.retry_on and failure.code not in _ASK_ELSEWHERE:
            return False
        if progress.attempts >= policy.max_attempts or self.deadline - time.monotonic() <= 0:
            return False
        if len(route.replicas) <= len(progress.tried) or not route.replicas.budget.try_spend():
            return False
        self.stats.retries += 1
        return True

    async def _call(self, leg: Leg) -> dict[str, model_wire.ShardOutcome]:
        """One grouped Predict to one process; a failure of the whole call is each of its shards'."""
        shards = leg.shards
        request = model_wire.shards_request(self.vectors, self.top_k, self.embedder_version, shards)
        replicas = [replica for _, replica in leg.picks]
        stub = replicas[0].stub
        started = time.time_ns()
        with _TRACER.start_as_current_span(
            f"shards → {leg.target}", kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": "meshserve.v1.PredictionService",
                        "rpc.method": "Predict", "shards": shards, "replica": replicas[0].id},
        ) as span:  # fmt: skip
            for replica in replicas:
                replica.outstanding += 1
                replica.calls += 1
            self.stats.attempts += 1
            try:
                reply: prediction_pb2.PredictResponse = await stub.Predict(
                    request, timeout=max(self.deadline - time.monotonic(), 0.001),
                    metadata=telemetry.inject_metadata())  # fmt: skip
            except grpc.aio.AioRpcError as error:
                span.set_status(Status(StatusCode.ERROR, error.code().name))
                details = error.details() or error.code().name
                failure = ShardFailure(error.code(), f"shards {', '.join(shards)}: {details}")
                outcomes: dict[str, model_wire.ShardOutcome] = {shard: failure for shard in shards}
            else:
                outcomes = model_wire.shard_outcomes(reply, shards, len(self.vectors), "shards")
            finally:
                for replica in replicas:
                    replica.outstanding -= 1
            if span.is_recording():  # (an unsampled search makes no span per shard)
                _shard_spans(outcomes, started)
        return outcomes


def _shard_spans(outcomes: dict[str, model_wire.ShardOutcome], started_ns: int) -> None:
    """A span per shard under the grouped call's, so one search's trace still shows every shard."""
    ended = time.time_ns()
    for shard, outcome in outcomes.items():
        span = _TRACER.start_span(f"shard {shard}", start_time=started_ns, attributes={"shard": shard})
        if isinstance(outcome, ShardFailure):
            span.set_status(Status(StatusCode.ERROR, outcome.code.name))
        span.end(end_time=ended)
