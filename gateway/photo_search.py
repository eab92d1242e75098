"""Photo search, read top to bottom: validate, look in the cache, detect, embed, fan out to every
shard, merge the top-k per detection, enrich from the catalogue."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from meshserve import telemetry
from meshserve.errors import InvalidInput, NotReady
from meshserve.gateway import model_wire
from meshserve.gateway.arms import Arms, observed
from meshserve.gateway.cache import TTLCache
from meshserve.gateway.calls import CallStats, ServiceCaller
from meshserve.gateway.enrich import CatalogueEnricher
from meshserve.gateway.model_wire import Detected
from meshserve.gateway.routes import RouteTable, SearchRoute
from meshserve.gateway.search_shadow import start_search_shadows
from meshserve.gateway.shadow import ShadowRunner
from meshserve.gateway.shard_fanout import ShardAnswer, ShardFanOut
from meshserve.wire.images import ImageLimits, probe

log = logging.getLogger(__name__)
_TRACER = trace.get_tracer("meshserve.gateway")

STAGE_SECONDS = Histogram("meshserve_gateway_stage_seconds", "Time per photo-search stage", ["stage"],
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
CALL_RETRIES = Counter("meshserve_gateway_retries_total", "Retries and hedges sent", ["stage", "kind"])
CALL_EJECTIONS = Counter("meshserve_gateway_ejections_total", "Replicas ejected as outliers", ["stage"])
COVERAGE = Histogram("meshserve_gateway_coverage", "Shards answered / shards expected per search",
                     buckets=(0.25, 0.5, 0.75, 0.9, 0.99, 1.0))
SHARD_MISSES = Counter("meshserve_gateway_shard_misses_total", "Shards that did not answer a search",
                       ["reason"])  # fmt: skip


@dataclass(frozen=True)
class SearchConfig:
    limits: ImageLimits = field(default_factory=lambda: ImageLimits(max_bytes=8 * 1024 * 1024,
                                                                     max_pixels=25_000_000))
    default_top_k: int = 10
    max_top_k: int = 100
    default_min_score: float = 0.3
    max_detections: int = 16
    # Every request field is bounded: a caller must not be able to pin memory (the labels of a
    # search are part of its cache key, kept for the TTL).
    max_labels: int = 64
    max_label_bytes: int = 128
    max_user_id_bytes: int = 256
    cache_entries: int = 10_000
    cache_max_bytes: int = 64 * 1024 * 1024
    cache_ttl_s: float = 60.0
    # Kept back from the shard fan-out so a slow shard becomes "missing", not a failed search.
    merge_reserve_s: float = 0.005

    def __post_init__(self) -> None:
        if not 1 <= self.default_top_k <= self.max_top_k <= 10_000:
            raise ValueError("need 1 ≤ default_top_k ≤ max_top_k ≤ 10000")
        if self.cache_max_bytes < 0:
            raise ValueError("--cache-max-mb must be ≥ 0")


@dataclass(frozen=True)
class SearchQuery:
    image: bytes
    top_k: int = 0  # 0 = default
    min_score: float = 0.0  # 0 = default
    labels: tuple[str, ...] = ()
    no_cache: bool = False
    user_id: str = ""


@dataclass(frozen=True)
class Match:
    item_id: str
    score: float
    shard: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Detection:
    found: Detected
    matches: tuple[Match, ...]


@dataclass(frozen=True)
class SearchResult:
    detections: tuple[Detection, ...]
    shards_expected: int
    shards_answered: int
    missing_shards: tuple[str, ...]
    versions: dict[str, str]
    trace_id: str = ""
    cached: bool = False
    arms: dict[str, str] = field(default_factory=dict)  # role → rollout arm (stable, canary, ab-a, ab-b)

    @property
    def coverage(self) -> float:
        return self.shards_answered / self.shards_expected if self.shards_expected else 0.0


SAME_OBJECT_IOU = 0.9


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def select_detections(found: list[Detected], min_score: float, labels: tuple[str, ...], limit: int) -> list[Detected]:
    """The detections a search goes on with: confident enough, of the wanted labels, best first,
    one per object. The detector reports a box whose category is in doubt once per likely
    category; the search keeps the best-scoring of them, so each object is searched once."""
    wanted = sorted((d for d in found if d.score >= min_score and (not labels or d.label in labels)),
                    key=lambda d: -d.score)  # fmt: skip
    kept: list[Detected] = []
    for d in wanted:
        if len(kept) == limit:
            break
        if all(_iou(d.box, k.box) < SAME_OBJECT_IOU for k in kept):
            kept.append(d)
    return kept


def merge_top_k(n_queries: int, answers: list[tuple[str, np.ndarray, np.ndarray]], top_k: int) -> list[list[Match]]:
    """Per query, the best top_k of every shard's (shard, item ids, scores); ties keep shard order."""
    merged: list[list[Match]] = []
    for q in range(n_queries):
        candidates: list[Match] = []
        for shard, ids, scores in answers:
            candidates += [Match(str(int(i)), float(s), shard) for i, s in zip(ids[q], scores[q], strict=True)]
        candidates.sort(key=lambda m: -m.score)
        merged.append(candidates[:top_k])
    return merged


_ENTRY_OVERHEAD = 200  # bytes of Python objects around each string, roughly


def cached_bytes(key: tuple, result: SearchResult) -> int:
    """An estimate of what one cached search holds: its key (labels included) and its result."""
    size = _ENTRY_OVERHEAD + sum(len(label) + _ENTRY_OVERHEAD for label in key[3]) + 64
    for detection in result.detections:
        size += _ENTRY_OVERHEAD + len(detection.found.label)
        for match in detection.matches:
            size += _ENTRY_OVERHEAD + len(match.item_id) + len(match.shard)
            size += sum(len(k) + len(v) + _ENTRY_OVERHEAD for k, v in match.attributes.items())
    return size


def _arms_of(route: SearchRoute) -> dict[str, str]:
    return {"detector": route.detector_arm, "embedder": route.embedder_arm}


class PhotoSearch:
    def __init__(self, routes: RouteTable, enricher: CatalogueEnricher, config: SearchConfig,
                 arms: Arms | None = None, shadows: ShadowRunner | None = None):  # fmt: skip
        self.routes = routes
        self.enricher = enricher
        self.config = config
        self.arms = arms or Arms()
        self.shadows = shadows or ShadowRunner()
        self.cache: TTLCache[tuple, SearchResult] = TTLCache("search", config.cache_entries, config.cache_ttl_s,
                                                             config.cache_max_bytes, cached_bytes)  # fmt: skip

    async def search(self, query: SearchQuery, deadline: float) -> SearchResult:
        top_k, min_score = self.validate(query)
        route, shadows = self.arms.search_route(self.routes)
        if route is None:
            raise NotReady("photo search has no route: a detector, an embedder and shards must be passing")
        key = self._cache_key(query, top_k, min_score, route)
        if not query.no_cache and (hit := self.cache.get(key)) is not None:
            return replace(hit, trace_id=telemetry.trace_id_of(), cached=True, arms=_arms_of(route))

        with self._stage("detect"), observed("detector", route.detector_version, route.detector_arm):
            found, stats = await model_wire.detect(ServiceCaller(route.detector, "detector"), query.image,
                                                   min_score, deadline)  # fmt: skip
            self._count(stats, "detector")
        detected = found
        found = select_detections(found, min_score, query.labels, self.config.max_detections)

        answers: list[ShardAnswer] = []
        vectors = np.zeros((0, 0), np.float32)
        boxes = np.zeros((0, 4), np.float32)
        if found:
            with self._stage("embed"), observed("embedder", route.embedder_version, route.embedder_arm):
                boxes = np.asarray([d.box for d in found], dtype=np.float32)
                vectors, _, stats = await model_wire.embed(ServiceCaller(route.embedder, "embedder"),
                                                           query.image, boxes, deadline)  # fmt: skip
                self._count(stats, "embedder")
            with self._stage("search"):
                answers = await self._fan_out(route, vectors, top_k, deadline)
        else:
            answers = [ShardAnswer(s.shard, reason="no detections") if len(s.replicas)
                       else ShardAnswer(s.shard, reason="no passing replica") for s in route.shards]  # fmt: skip

        with self._stage("merge"):
            merged = self._merge(len(found), answers, top_k)
        with self._stage("enrich"):
            attributes = await self.enricher.lookup({m.item_id for per in merged for m in per})

        missing = tuple(a.shard for a in answers if a.ids is None and a.reason != "no detections")
        result = SearchResult(
            detections=tuple(
                Detection(d, tuple(Match(m.item_id, m.score, m.shard, attributes.get(m.item_id, {}))
                                   for m in per))
                for d, per in zip(found, merged, strict=True)
            ),
            shards_expected=len(route.shards),
            shards_answered=len(route.shards) - len(missing),
            missing_shards=missing,
            versions={"detector": route.detector_version, "embedder": route.embedder_version,
                      "index": route.index},
            trace_id=telemetry.trace_id_of(),
            arms=_arms_of(route),
        )  # fmt: skip
        COVERAGE.observe(result.coverage)
        start_search_shadows(self.shadows, shadows, query.image, min_score, detected, boxes,
                             [[m.item_id for m in per] for per in merged], top_k, self._fan_out, self._merge)
        if result.shards_expected and not missing and not query.no_cache:
            self.cache.put(key, result)
        return result

    # -- stages ------------------------------------------------------------------------------

    def validate(self, query: SearchQuery) -> tuple[int, float]:
        """Refuse bad input before any stage is called; return the effective top_k and min_score."""
        cfg = self.config
        with self._stage("validate"):
            if not query.image:
                raise InvalidInput("image: empty")
            if len(query.image) > cfg.limits.max_bytes:
                raise InvalidInput(f"image: {len(query.image)} bytes exceeds the limit of {cfg.limits.max_bytes}")
            probe(query.image, cfg.limits)  # format and pixel count from the header, nothing decoded
            top_k = query.top_k or cfg.default_top_k
            if not 1 <= top_k <= cfg.max_top_k:
                raise InvalidInput(f"top_k: {query.top_k} is outside [1, {cfg.max_top_k}]")
            min_score = query.min_score or cfg.default_min_score
            if not 0.0 <= min_score <= 1.0:
                raise InvalidInput(f"min_detection_score: {query.min_score} is outside [0, 1]")
            if len(query.labels) > cfg.max_labels:
                raise InvalidInput(f"labels: {len(query.labels)} labels exceed the limit of {cfg.max_labels}")
            for label in query.labels:
                if len(label.encode()) > cfg.max_label_bytes:
                    raise InvalidInput(f"labels: a label of {len(label.encode())} bytes exceeds the limit of "
                                       f"{cfg.max_label_bytes}")  # fmt: skip
            if len(query.user_id.encode()) > cfg.max_user_id_bytes:
                raise InvalidInput(f"user_id: {len(query.user_id.encode())} bytes exceed the limit of "
                                   f"{cfg.max_user_id_bytes}")  # fmt: skip
        return top_k, min_score

    async def _fan_out(
        self, route: SearchRoute, vectors: np.ndarray, top_k: int, deadline: float
    ) -> list[ShardAnswer]:
        fan_out = ShardFanOut(vectors, top_k, route.embedder_version, deadline - self.config.merge_reserve_s)
        answers = await fan_out.run(route.shards)
        self._count(fan_out.stats, "indexer")
        for answer in answers:
            if answer.ids is None:
                SHARD_MISSES.labels(answer.reason).inc()
        return answers

    @staticmethod
    def _merge(n_queries: int, answers: list[ShardAnswer], top_k: int) -> list[list[Match]]:
        answered = [(a.shard, a.ids, a.scores) for a in answers if a.ids is not None and a.scores is not None]
        return merge_top_k(n_queries, answered, top_k)

    def _cache_key(self, query: SearchQuery, top_k: int, min_score: float, route: SearchRoute) -> tuple:
        digest = hashlib.sha256(query.image).hexdigest()
        labels = tuple(sorted(set(query.labels)))
        return (digest, top_k, min_score, labels, route.detector_version, route.embedder_version,
                tuple(s.shard for s in route.shards))

    @staticmethod
    def _count(stats: CallStats, stage: str) -> None:
        if stats.retries:
            CALL_RETRIES.labels(stage, "retry").inc(stats.retries)
        if stats.hedges:
            CALL_RETRIES.labels(stage, "hedge").inc(stats.hedges)
        if stats.ejections:
            CALL_EJECTIONS.labels(stage).inc(stats.ejections)

    class _StageTimer:
        def __init__(self, name: str):
            self.name = name
            self.span_cm = _TRACER.start_as_current_span(name)

        def __enter__(self) -> None:
            self.started = time.perf_counter()
            self.span_cm.__enter__()

        def __exit__(self, *exc: object) -> None:
            self.span_cm.__exit__(*exc)  # type: ignore[arg-type]
            trace_id = telemetry.trace_id_of()
            STAGE_SECONDS.labels(self.name).observe(time.perf_counter() - self.started,
                                                    {"trace_id": trace_id} if trace_id else None)  # fmt: skip

    def _stage(self, name: str) -> PhotoSearch._StageTimer:
        return PhotoSearch._StageTimer(name)
