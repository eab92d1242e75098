"""Photo search's shadows: the candidate detector on the same photo, and the candidate embedder's
whole search (its vectors against its own shard set) on the same detections."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from meshserve.gateway import model_wire
from meshserve.gateway.arms import SearchShadows
from meshserve.gateway.calls import ServiceCaller
from meshserve.gateway.model_wire import Detected
from meshserve.gateway.routes import SearchRoute
from meshserve.gateway.shadow import Comparison, ShadowRunner, compare_detections, compare_matches

# (route, vectors, top_k, deadline) → per-shard answers; PhotoSearch's own fan-out.
FanOut = Callable[[SearchRoute, np.ndarray, int, float], Awaitable[list[Any]]]
Merge = Callable[[int, list[Any], int], list[list[Any]]]


def start_search_shadows(
    runner: ShadowRunner, shadows: SearchShadows, image: bytes, min_score: float,
    stable_found: Sequence[Detected], boxes: np.ndarray, stable_ids: Sequence[Sequence[str]], top_k: int,
    fan_out: FanOut, merge: Merge,
) -> None:  # fmt: skip
    if shadows.detector is not None:
        version, replicas = shadows.detector

        async def detect(deadline: float) -> Comparison:
            found, _ = await model_wire.detect(ServiceCaller(replicas, "detector shadow"), image, min_score, deadline)
            return compare_detections(stable_found, found)

        runner.submit("detector", version, detect)
    route = shadows.embedder
    if route is not None:

        async def search(deadline: float) -> Comparison:
            if not len(boxes):
                return compare_matches([], [])
            vectors, _, _ = await model_wire.embed(ServiceCaller(route.embedder, "embedder shadow"), image, boxes,
                                                   deadline)  # fmt: skip
            answers = await fan_out(route, vectors, top_k, deadline)
            merged = merge(len(boxes), answers, top_k)
            return compare_matches(stable_ids, [[m.item_id for m in per] for per in merged])

        runner.submit("embedder", route.embedder_version, search)
