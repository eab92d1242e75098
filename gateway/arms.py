"""Per-request arm choice under the rollout policies (stable / canary / ab-a / ab-b, plus a version to
shadow), and the per-version metrics every answering call is counted in."""

from __future__ import annotations

import contextvars
import functools
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

from opentelemetry import trace
from prometheus_client import Counter, Histogram

from meshserve import telemetry
from meshserve.gateway.balancer import ReplicaSet
from meshserve.gateway.rollout_policy import CANARY, STABLE, ArmChoice, RolloutPolicy, choose_arm
from meshserve.gateway.rollout_store import RolloutPolicies
from meshserve.gateway.routes import RouteTable, SearchRoute

SUBJECT_METADATA = "x-meshserve-subject"
# The caller's subject for sticky A/B splits, set by the servicers for the request being served.
SUBJECT: contextvars.ContextVar[str] = contextvars.ContextVar("meshserve_subject", default="")

VERSION_REQUESTS = Counter("meshserve_gateway_version_requests_total",
                           "Calls answered (or failed) per service, model version and rollout arm",
                           ["service", "version", "arm", "outcome"])
VERSION_LATENCY = Histogram("meshserve_gateway_version_latency_seconds",
                            "Call latency per service, model version and rollout arm", ["service", "version", "arm"],
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
UNROUTABLE = Counter("meshserve_gateway_rollout_unroutable_total",
                     "Requests whose chosen arm had no passing replica of its version", ["service", "version"])


def subject_from(metadata: object, fallback: str = "") -> str:
    """The A/B subject of a call: metadata `x-meshserve-subject`, else a request field."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == SUBJECT_METADATA:
            return str(value)[:256]
    return fallback[:256]


# Label children looked up once per label set, not per call (versions and arms are few).
_version_requests = functools.cache(VERSION_REQUESTS.labels)
_version_latency = functools.cache(VERSION_LATENCY.labels)


@contextmanager
def observed(service: str, version: str, arm: str) -> Iterator[None]:
    """Count one call to `service`@`version` on `arm`: outcome and latency, and tag the span."""
    if telemetry.exporting():
        span = trace.get_current_span()
        span.set_attribute(f"{service}.version", version)
        span.set_attribute(f"{service}.arm", arm)
    started = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        _version_requests(service, version, arm, outcome).inc()
        _version_latency(service, version, arm).observe(time.perf_counter() - started)


@dataclass(frozen=True)
class Routed:
    version: str
    arm: str
    replicas: ReplicaSet
    shadow: tuple[str, ReplicaSet] | None = None


@dataclass(frozen=True)
class SearchShadows:
    detector: tuple[str, ReplicaSet] | None = None
    embedder: SearchRoute | None = None  # the candidate's whole search route: embedder + its shards


class Arms:
    """Chooses, per request, which version of a service answers under its rollout policy."""

    def __init__(self, policies: RolloutPolicies | None = None, rng: random.Random | None = None):
        self.policies = policies
        self._random = rng or random.Random()

    def policy(self, service: str) -> RolloutPolicy | None:
        return self.policies.policy(service) if self.policies is not None else None

    def _choice(self, policy: RolloutPolicy, eligible: set[str]) -> ArmChoice | None:
        """The policy's arm for this request, narrowed to versions that can answer now."""
        choice = choose_arm(policy, SUBJECT.get(), self._random.random(), self._random.random())
        candidate = policy.candidate.version if policy.candidate else None
        if choice.version not in eligible:
            UNROUTABLE.labels(policy.service, choice.version).inc()
            if choice.version == candidate and policy.stable in eligible:
                choice = ArmChoice(policy.stable, STABLE)
            elif choice.version == policy.stable and candidate in eligible:
                assert candidate is not None
                choice = ArmChoice(candidate, CANARY)
            else:
                return None
        if choice.shadow is not None and choice.shadow not in eligible:
            choice = ArmChoice(choice.version, choice.arm)
        return choice

    def route(self, service: str, sets: Mapping[str, ReplicaSet], newest: str | None) -> Routed | None:
        """`sets`: the passing replica sets by version; `newest`: the pick without a policy."""
        policy = self.policy(service)
        if policy is None:
            return None if newest is None else Routed(newest, STABLE, sets[newest])
        choice = self._choice(policy, {v for v, s in sets.items() if len(s)})
        if choice is None:
            return None
        shadow = (choice.shadow, sets[choice.shadow]) if choice.shadow else None
        return Routed(choice.version, choice.arm, sets[choice.version], shadow)

    def search_route(self, routes: RouteTable) -> tuple[SearchRoute | None, SearchShadows]:
        """The whole search's route: detector and embedder arms chosen apart; the embedder's version
        fixes the shard set, so one search never mixes versions."""
        newest = routes.newest("detector")
        detector = self.route("detector", routes.passing_versions("detector"), newest[0] if newest else None)
        if detector is None:
            return None, SearchShadows()
        policy = self.policy("embedder")
        embedder_arm, embedder_shadow = STABLE, None
        if policy is None:
            embedder_version = routes.live_embedder_version
        else:
            eligible = {v for v in policy.versions() if routes.embedder_unready(v, complete=v != policy.stable) is None}
            choice = self._choice(policy, eligible)
            if choice is None:
                return None, SearchShadows()
            embedder_version, embedder_arm, embedder_shadow = choice.version, choice.arm, choice.shadow
        if embedder_version is None:
            return None, SearchShadows()
        route = routes.search_route_with(detector.version, detector.replicas, embedder_version)
        if route is None:
            return None, SearchShadows()
        route = replace(route, detector_arm=detector.arm, embedder_arm=embedder_arm)
        shadow_route = None
        if embedder_shadow is not None:
            shadow_route = routes.search_route_with(detector.version, detector.replicas, embedder_shadow)
        return route, SearchShadows(detector.shadow, shadow_route)
