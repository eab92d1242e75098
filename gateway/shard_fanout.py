"""A photo search's shard fan-out: the shards grouped by the indexer process that serves them, one call
per process naming its shards, and a shard that failed asked again of another replica that has it.
With a hedge delay (`gateway --hedge-shards-ms`), the shards of a call that is slower than that are
also asked of other replicas, and the first answer serves (a host whose link went down mid-call).

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
    last_code: grpc.StatusCode | None = None


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
            self._count_attempts(legs, progress)
            results = await self._round(legs, progress)
            for leg, by_shard in results:  # the answers first: a hedged shard may also have failed elsewhere
                for route, replica in leg.picks:
                    outcome = by_shard[route.shard]
                    if not isinstance(outcome, ShardFailure) and route.shard not in answers:
                        route.replicas.succeeded(replica)
                        answers[route.shard] = ShardAnswer(route.shard, outcome[0], outcome[1])
            failed: dict[str, ShardRoute] = {}
            for leg, by_shard in results:
                for route, replica in leg.picks:
                    outcome = by_shard[route.shard]
                    if isinstance(outcome, ShardFailure):  # counts against the replica even if answered elsewhere
                        self._count_failure(route, replica, outcome, progress[route.shard])
                        if route.shard not in answers:
                            failed[route.shard] = route
            pending = []
            for shard, route in failed.items():
                if self._may_retry(route, progress[shard]):
                    self.stats.retries += 1
                    pending.append(route)
                else:
                    answers[shard] = ShardAnswer(shard, reason=progress[shard].reason)
        return [answers[route.shard] for route in shards]

    @staticmethod
    def _count_attempts(legs: Sequence[Leg], progress: dict[str, _Progress]) -> None:
        for leg in legs:
            for route, _ in leg.picks:
                progress[route.shard].attempts += 1
                progress[route.shard].tried.add(leg.target)

    async def _round(self, legs: list[Leg], progress: dict[str, _Progress]
                     ) -> list[tuple[Leg, dict[str, model_wire.ShardOutcome]]]:  # fmt: skip
        """Every leg's outcomes. With a hedge delay in the indexers' policy, the shards of a leg that has
        not answered by then are asked once more of other replicas, and whichever answers first serves;
        a leg all of whose shards are answered elsewhere is cancelled (its outcomes are not returned)."""
        hedge_ms = legs[0].picks[0][0].replicas.policy.hedge_after_ms if legs else None
        if hedge_ms is None:
            if len(legs) == 1:  # the common case with one indexer process: no task to make
                return [(legs[0], await self._call(legs[0]))]
            return list(zip(legs, await asyncio.gather(*(self._call(leg) for leg in legs)), strict=True))
        running = {asyncio.ensure_future(self._call(leg)): leg for leg in legs}
        results: list[tuple[Leg, dict[str, model_wire.ShardOutcome]]] = []
        answered: set[str] = set()
        hedge_at: float | None = time.monotonic() + hedge_ms / 1000.0
        try:
            while running:
                wait_s = None if hedge_at is None else max(0.0, hedge_at - time.monotonic())
                done, _ = await asyncio.wait(running, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    leg = running.pop(task)
                    by_shard = task.result()
                    results.append((leg, by_shard))
                    answered.update(s for s, o in by_shard.items() if not isinstance(o, ShardFailure))
                for task, leg in list(running.items()):
                    if answered.issuperset(leg.shards):
                        task.cancel()
                        del running[task]
                if hedge_at is not None and time.monotonic() >= hedge_at:
                    hedge_at = None  # one hedge per round
                    slow = {route.shard: route for leg in running.values() for route, _ in leg.picks
                            if route.shard not in answered}  # fmt: skip
                    hedges = self._hedges(list(slow.values()), progress)
                    self._count_attempts(hedges, progress)
                    running.update({asyncio.ensure_future(self._call(leg)): leg for leg in hedges})
        finally:
            for task in running:
                task.cancel()
        return results

    def _hedges(self, slow: list[ShardRoute], progress: dict[str, _Progress]) -> list[Leg]:
        """Legs asking the slow shards of other replicas than they were asked of, as far as each shard has
        another replica and its retry budget a token."""
        if self.deadline - time.monotonic() <= 0:
            return []
        legs, _ = plan(slow, {route.shard: progress[route.shard].tried for route in slow})
        hedged = [Leg(leg.target, tuple((r, replica) for r, replica in leg.picks if r.replicas.budget.try_spend()))
                  for leg in legs]  # fmt: skip
        hedged = [leg for leg in hedged if leg.picks]
        self.stats.hedges += sum(len(leg.picks) for leg in hedged)
        return hedged

    def _count_failure(self, route: ShardRoute, replica: Replica, failure: ShardFailure, progress: _Progress) -> None:
        log.debug("shard %s: %s", route.shard, failure.message)
        self.stats.errors.append(f"{replica.id}: {failure.code.name}")
        if failure.code in _REPLICA_FAULTS and route.replicas.failed(replica):
            self.stats.ejections += 1
        progress.reason = _REASONS.get(failure.code, "UpstreamFailed")
        progress.last_code = failure.code

    def _may_retry(self, route: ShardRoute, progress: _Progress) -> bool:
        """Whether a shard that failed this round is asked of another replica in the next."""
        policy = route.replicas.policy
        if progress.last_code not in policy.retry_on and progress.last_code not in _ASK_ELSEWHERE:
            return False
        if progress.attempts >= policy.max_attempts or self.deadline - time.monotonic() <= 0:
            return False
        return len(route.replicas) > len(progress.tried) and route.replicas.budget.try_spend()

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
