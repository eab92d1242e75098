"""Listing checks, read top to bottom: validate, take the policy in force, ask every enabled model at
once (each under its own timeout inside the caller's deadline, cached verdicts first), decide."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

from opentelemetry import trace
from prometheus_client import Counter, Histogram

from meshserve import telemetry
from meshserve.errors import DeadlineExpired, InvalidInput, MeshError, NotReady, Overloaded
from meshserve.gateway import listing_wire
from meshserve.gateway.arms import Arms, Routed, observed
from meshserve.gateway.balancer import ReplicaSet
from meshserve.gateway.calls import ServiceCaller
from meshserve.gateway.flow_config import FlowConfigs
from meshserve.gateway.flow_policy import CLASSIFIERS, DETECTOR, GUARD_MODELS, LISTING_GUARD, SHIPPING, GuardPolicy
from meshserve.gateway.guard_decision import Decision, Status, Verdict, decide
from meshserve.gateway.listing_routes import ListingRoutes
from meshserve.gateway.routes import RouteTable
from meshserve.gateway.shadow import Comparison, ShadowRunner, compare_labels, compare_scores
from meshserve.gateway.verdict_cache import VerdictCache, VerdictKey
from meshserve.v1 import prediction_pb2
from meshserve.wire.images import ImageLimits, probe

log = logging.getLogger(__name__)
_TRACER = trace.get_tracer("meshserve.gateway")

VERDICTS = Counter("meshserve_gateway_guard_verdicts_total", "Listing-guard verdicts", ["model", "status"])
DECISIONS = Counter("meshserve_gateway_guard_decisions_total", "Listing-guard decisions", ["decision", "partial"])
MODEL_SECONDS = Histogram("meshserve_gateway_guard_model_seconds", "Time waiting for one listing model",
                          ["model"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))

SHIPPING_ATTRIBUTES = ("width_cm", "height_cm", "depth_cm", "weight_kg")


@dataclass(frozen=True)
class GuardConfig:
    max_text_bytes: int = 16 * 1024  # title and description each
    max_category_bytes: int = 64  # what the classifiers accept
    max_title_bytes_to_models: int = 1024  # classifiers read at most this much title (cut at a character)
    max_photos: int = 8
    max_attributes: int = 64
    max_attribute_bytes: int = 1024
    limits: ImageLimits = field(default_factory=lambda: ImageLimits(max_bytes=8 * 1024 * 1024,
                                                                     max_pixels=25_000_000))
    # Kept back from the caller's deadline to build the reply: a model still running then
    # makes the whole Check DEADLINE_EXCEEDED rather than an answer the caller never reads.
    # gRPC reports a model call's own deadline 2–6 ms after it passed (gRPC core's timers), and
    # the reply must still leave before the caller's deadline, so the reserve covers that too.
    reply_reserve_s: float = 0.010
    cache_entries: int = 50_000
    cache_bytes: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class Listing:
    title: str
    description: str
    price_cents: int
    category: str
    attributes: Mapping[str, str]
    images: tuple[bytes, ...] = ()
    listing_id: str = ""

    def content_hash(self) -> str:
        h = hashlib.sha256()
        head = [self.title, self.description, self.price_cents, self.category, sorted(self.attributes.items())]
        h.update(json.dumps(head, ensure_ascii=False).encode())
        for image in self.images:
            h.update(hashlib.sha256(image).digest())
        return h.hexdigest()


@dataclass(frozen=True)
class GuardResult:
    verdicts: tuple[Verdict, ...]
    decision: Decision
    reasons: tuple[str, ...]
    policy_version: str
    suggestions: tuple[tuple[str, float], ...] = ()
    trace_id: str = ""

    @property
    def partial(self) -> bool:
        return any(v.status not in (Status.OK, Status.DISABLED) for v in self.verdicts)

    @property
    def versions(self) -> dict[str, str]:
        return {v.model: v.version for v in self.verdicts if v.status is Status.OK}


class _CutByCaller(Exception):
    """A model call ran into the caller's deadline (not its own timeout)."""


def _cut_utf8(data: bytes, limit: int) -> bytes:
    return data[:limit].decode("utf-8", errors="ignore").encode() if len(data) > limit else data


class _ModelRequests:
    """What each kind of listing model is sent for one listing, built once per Check on first use: the
    three classifiers (and a shadow of any model) get the very same request."""

    def __init__(self, listing: Listing, max_title_bytes: int):
        self.listing = listing
        self.title = _cut_utf8(listing.title.encode(), max_title_bytes)

    @cached_property
    def classifier(self) -> prediction_pb2.PredictRequest:
        given = self.listing
        return listing_wire.classifier_request(self.title, given.description.encode(), given.price_cents / 100.0,
                                               given.category.encode())  # fmt: skip

    @cached_property
    def shipping(self) -> prediction_pb2.PredictRequest:
        a = {name: float(self.listing.attributes[name]) for name in SHIPPING_ATTRIBUTES}
        return listing_wire.shipping_request((a["width_cm"], a["height_cm"], a["depth_cm"]), a["weight_kg"],
                                             self.listing.category.encode(), self.title)  # fmt: skip

    @cached_property
    def detector(self) -> prediction_pb2.PredictRequest:
        return listing_wire.detector_request(list(self.listing.images))


# Label children looked up once per label set, not per call.
_verdicts = functools.cache(VERDICTS.labels)
_decisions = functools.cache(DECISIONS.labels)
_model_seconds = functools.cache(MODEL_SECONDS.labels)


class ListingGuard:
    def __init__(self, routes: RouteTable, listing_routes: ListingRoutes, configs: FlowConfigs,
                 config: GuardConfig | None = None, arms: Arms | None = None,
                 shadows: ShadowRunner | None = None):  # fmt: skip
        self.routes = routes
        self.listing_routes = listing_routes
        self.configs = configs
        self.config = config or GuardConfig()
        self.arms = arms or Arms()
        self.shadows = shadows or ShadowRunner()
        self.cache = VerdictCache(self.config.cache_entries, self.config.cache_bytes)

    async def check(self, listing: Listing, models: tuple[str, ...], deadline: float) -> GuardResult:
        self.validate(listing, models)
        state = self.configs.state(LISTING_GUARD)
        policy: GuardPolicy = state.policy
        span = trace.get_current_span()
        span.set_attribute("policy_version", policy.version)
        reply_by = deadline - self.config.reply_reserve_s
        if reply_by <= time.monotonic():
            raise DeadlineExpired("listing guard: no time left to ask any model")
        key = listing.content_hash()
        requests = _ModelRequests(listing, self.config.max_title_bytes_to_models)
        wanted = models or GUARD_MODELS
        jobs: dict[str, Coroutine[None, None, Verdict]] = {}
        verdicts: dict[str, Verdict] = {}
        suggestions: list[tuple[str, float]] = []
        for model in wanted:
            if model == DETECTOR and not listing.images:
                continue  # no photo, nothing to suggest
            if not policy.model(model).enabled:
                verdicts[model] = Verdict(model, Status.DISABLED, detail="disabled by policy")
            elif model == SHIPPING and not all(a in listing.attributes for a in SHIPPING_ATTRIBUTES):
                verdicts[model] = Verdict(model, Status.DISABLED,
                                          detail=f"needs attributes {', '.join(SHIPPING_ATTRIBUTES)}")
            else:
                jobs[model] = self._judge(model, requests, key, policy, reply_by, suggestions)

        answered = await asyncio.gather(*jobs.values(), return_exceptions=True)
        for model, answer in zip(jobs, answered, strict=True):
            if isinstance(answer, _CutByCaller):
                raise DeadlineExpired(f"listing guard: the caller's deadline ended while {model} was still "
                                      f"working (its timeout is {policy.model(model).timeout_ms:g} ms)")
            if isinstance(answer, BaseException):
                raise answer
            verdicts[model] = answer
        ordered = tuple(verdicts[m] for m in GUARD_MODELS if m in verdicts)
        decision, reasons = decide(ordered, policy)
        result = GuardResult(ordered, decision, tuple(reasons), policy.version, tuple(suggestions),
                             telemetry.trace_id_of())  # fmt: skip
        for v in ordered:
            _verdicts(v.model, v.status.name).inc()
        _decisions(decision.name, "true" if result.partial else "false").inc()
        span.set_attribute("decision", decision.name)
        span.set_attribute("partial", result.partial)
        return result

    # -- stages ------------------------------------------------------------------------------

    def validate(self, listing: Listing, models: tuple[str, ...]) -> None:
        """Refuse bad input before any model is called; the message names the field."""
        cfg = self.config
        if not listing.title.strip() and not listing.description.strip() and not listing.images:
            raise InvalidInput("listing: empty (no title, description or photo)")
        if not listing.title.strip():
            raise InvalidInput("listing.title: empty")
        for name in ("title", "description"):
            size = len(getattr(listing, name).encode())
            if size > cfg.max_text_bytes:
                raise InvalidInput(f"listing.{name}: {size} bytes exceeds the limit of {cfg.max_text_bytes}")
        if len(listing.category.encode()) > cfg.max_category_bytes:
            raise InvalidInput(f"listing.category: longer than {cfg.max_category_bytes} bytes")
        if listing.price_cents <= 0:
            raise InvalidInput(f"listing.price_cents: {listing.price_cents}; need a price > 0")
        if listing.price_cents > 10**13:
            raise InvalidInput(f"listing.price_cents: {listing.price_cents} is beyond any real price")
        if len(listing.attributes) > cfg.max_attributes:
            raise InvalidInput(f"listing.attributes: {len(listing.attributes)} entries, at most {cfg.max_attributes}")
        for k, v in listing.attributes.items():
            if len(k.encode()) + len(v.encode()) > cfg.max_attribute_bytes:
                raise InvalidInput(f"listing.attributes[{k[:40]!r}]: longer than {cfg.max_attribute_bytes} bytes")
        for name in SHIPPING_ATTRIBUTES:
            if name in listing.attributes:
                value = _number(listing.attributes[name])
                if value is None or value <= 0:
                    raise InvalidInput(f"listing.attributes[{name!r}]: {listing.attributes[name]!r}; "
                                       "need a finite number > 0")  # fmt: skip
        if len(listing.images) > cfg.max_photos:
            raise InvalidInput(f"listing.images: {len(listing.images)} photos, at most {cfg.max_photos}")
        for i, image in enumerate(listing.images):
            try:
                probe(image, cfg.limits)
            except InvalidInput as exc:
                raise InvalidInput(f"listing.images[{i}]: {exc}") from None
        unknown = [m for m in models if m not in GUARD_MODELS]
        if unknown:
            raise InvalidInput(f"models: unknown model {unknown[0]!r} (known: {', '.join(GUARD_MODELS)})")

    async def _judge(self, model: str, requests: _ModelRequests, key: str, policy: GuardPolicy, reply_by: float,
                     suggestions: list[tuple[str, float]]) -> Verdict:  # fmt: skip
        if not telemetry.exporting():  # a span per model only where spans are recorded
            return await self._ask(model, requests, key, policy, reply_by, suggestions)
        with _TRACER.start_as_current_span(f"guard {model}", attributes={"model": model,
                                           "policy_version": policy.version}) as span:  # fmt: skip
            verdict = await self._ask(model, requests, key, policy, reply_by, suggestions)
            span.set_attribute("status", verdict.status.name)
            span.set_attribute("model_version", verdict.version)
            span.set_attribute("arm", verdict.arm)
            return verdict

    async def _ask(self, model: str, requests: _ModelRequests, key: str, policy: GuardPolicy, reply_by: float,
                   suggestions: list[tuple[str, float]]) -> Verdict:  # fmt: skip
        rule = policy.model(model)
        thresholds = {"review_threshold": rule.review_threshold, "block_threshold": rule.block_threshold}
        routed = self._route(model)
        if routed is None:
            return Verdict(model, Status.UNAVAILABLE, detail="no passing replica", **thresholds)
        version, arm, caller = routed.version, routed.arm, ServiceCaller(routed.replicas, model)
        if model != DETECTOR and (hit := self.cache.get(VerdictKey(key, model, version, policy.version))) is not None:
            return replace(hit, cached=True, latency_ms=0.0, arm=arm)
        timeout_s = rule.timeout_ms / 1000.0
        started = time.monotonic()
        call_deadline = min(started + timeout_s, reply_by)
        try:
            with observed(model, version, arm):
                answer = await self._call(model, caller, requests, call_deadline, policy.top_k, suggestions)
        except (DeadlineExpired, TimeoutError) as exc:
            if call_deadline < started + timeout_s:
                raise _CutByCaller() from exc
            status, detail = Status.TIMEOUT, f"no answer within {rule.timeout_ms:g} ms"
        except (NotReady, Overloaded) as exc:
            status, detail = Status.UNAVAILABLE, str(exc)
        except MeshError as exc:  # BadReply, the model refusing our input, an upstream failure
            status, detail = Status.ERROR, str(exc)
        else:
            latency_ms = 1000 * (time.monotonic() - started)
            _model_seconds(model).observe(latency_ms / 1000)
            verdict = Verdict(model, Status.OK, answer.version or version, answer.score, label=answer.label,
                              latency_ms=latency_ms, arm=arm, **thresholds)  # fmt: skip
            if routed.shadow is not None:
                self._shadow(model, routed.shadow, requests, policy.top_k, answer, suggestions)
            if model != DETECTOR:
                self.cache.put(VerdictKey(key, model, verdict.version, policy.version), verdict)
            return verdict
        log.debug("listing guard: %s %s: %s", model, status.name, detail)
        return Verdict(model, status, version, detail=detail, arm=arm,
                       latency_ms=1000 * (time.monotonic() - started), **thresholds)  # fmt: skip

    def _route(self, model: str) -> Routed | None:
        """The version (and rollout arm) answering this request, with a candidate to shadow."""
        if model == DETECTOR:
            newest = self.routes.newest("detector")
            return self.arms.route(model, self.routes.passing_versions("detector"), newest[0] if newest else None)
        route = self.listing_routes.route(model)
        return self.arms.route(model, self.listing_routes.passing_versions(model), route.version if route else None)

    def _shadow(self, model: str, shadow: tuple[str, ReplicaSet], requests: _ModelRequests, top_k: int,
                stable: listing_wire.Answer, suggestions: list[tuple[str, float]]) -> None:  # fmt: skip
        version, replicas = shadow
        stable_labels = [category for category, _ in suggestions]

        async def compare(deadline: float) -> Comparison:
            seen: list[tuple[str, float]] = []
            answer = await self._call(model, ServiceCaller(replicas, f"{model} shadow"), requests, deadline, top_k,
                                      seen)  # fmt: skip
            if model == DETECTOR:
                return compare_labels(stable_labels, [category for category, _ in seen])
            return compare_scores(stable.score, answer.score)

        self.shadows.submit(model, version, compare)

    async def _call(self, model: str, caller: ServiceCaller, requests: _ModelRequests, deadline: float, top_k: int,
                    suggestions: list[tuple[str, float]]) -> listing_wire.Answer:  # fmt: skip
        if model in CLASSIFIERS:
            return await listing_wire.classify(caller, requests.classifier, deadline)
        if model == SHIPPING:
            return await listing_wire.estimate_shipping(caller, requests.shipping, deadline)
        n_images = len(requests.listing.images)
        version, ranked = await listing_wire.detect_categories(caller, requests.detector, n_images, deadline, top_k)
        suggestions.extend(ranked)
        return listing_wire.Answer(version, ranked[0][1] if ranked else 0.0, ranked[0][0] if ranked else "")

    # -- health ------------------------------------------------------------------------------

    def servable(self) -> tuple[bool, str]:
        """Whether a Check can be answered with substance: some enabled classifier is routable."""
        policy: GuardPolicy = self.configs.policy(LISTING_GUARD)
        enabled = [m for m in CLASSIFIERS if policy.model(m).enabled]
        if not enabled:
            return False, "every classifier is disabled by policy"
        if not any(self.listing_routes.route(m) is not None for m in enabled):
            return False, "no enabled classifier has a passing replica"
        return True, "ok"


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
