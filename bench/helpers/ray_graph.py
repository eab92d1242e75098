"""bench/ray_serve.py's peer: the photo search pipeline as a Ray Serve deployment graph over the same models and shards.

Detector and embedder replicas batch concurrent requests (`serve.batch`, at most 8 per model call and no waiting
for company, as the mesh's servers do), each shard is a replica that searches one hnswlib shard directory, and the
ingress composes them through DeploymentHandles: detect, keep the confident detections, embed their crops, search
every shard at once, merge. Ray Serve is an optional extra (`pip install -e '.[bench]'`); nothing in the product
imports this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

MAX_BATCH = 8  # rows per model call, the mesh servers' default (servers/batching.py)
MAX_DETECTIONS = 16  # detections searched per photo, the gateway's default
# Replicas reserve no Ray CPUs: the two cores are shared by every replica as the mesh's processes share them.
ACTOR = {"num_cpus": 0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}}
IN_FLIGHT = 64  # requests a replica takes at once (Serve's default of 5 would cap batching and fan-in)

# A search's answer: per kept detection (label, score, box, [(item id, score), …] best first)
Answer = list[tuple[str, float, tuple[float, float, float, float], list[tuple[str, float]]]]


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


@serve.deployment(ray_actor_options=ACTOR, max_ongoing_requests=IN_FLIGHT)
class DetectorReplica:
    def __init__(self, model_dir: str):
        from meshserve.inference.detector import Detector

        _one_torch_thread()
        self.detector = Detector.load(Path(model_dir))
        self.names = list(self.detector.classes)

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.0)
    async def __call__(self, requests: list[tuple[bytes, float]]) -> list[tuple[np.ndarray, list[str], np.ndarray]]:
        # the model runs on a thread of its own so the replica's loop keeps queueing the next batch meanwhile
        return await asyncio.to_thread(self._detect, requests)

    def _detect(self, requests: list[tuple[bytes, float]]) -> list[tuple[np.ndarray, list[str], np.ndarray]]:
        from meshserve.wire.images import decode_image

        out: list[Any] = [None] * len(requests)
        by_threshold: dict[float, list[int]] = {}
        for i, (_, min_score) in enumerate(requests):
            by_threshold.setdefault(min_score, []).append(i)
        for min_score, rows in by_threshold.items():
            boxes, labels, scores = self.detector.detect([decode_image(requests[i][0]) for i in rows], min_score)
            for i, b, lab, s in zip(rows, boxes, labels, scores, strict=True):
                out[i] = (b, [self.names[int(k)] for k in lab], s)
        return out


@serve.deployment(ray_actor_options=ACTOR, max_ongoing_requests=IN_FLIGHT)
class EmbedderReplica:
    def __init__(self, model_dir: str):
        from meshserve.inference.embedder import Embedder

        _one_torch_thread()
        self.embedder = Embedder.load(Path(model_dir))

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.0)
    async def __call__(self, requests: list[tuple[bytes, np.ndarray]]) -> list[np.ndarray]:
        return await asyncio.to_thread(self._embed, requests)

    def _embed(self, requests: list[tuple[bytes, np.ndarray]]) -> list[np.ndarray]:
        from meshserve.wire.images import clip_boxes, decode_image

        images = [decode_image(image) for image, _ in requests]
        boxes = [clip_boxes(b, img.shape[1], img.shape[0]) for img, (_, b) in zip(images, requests, strict=True)]
        vectors = self.embedder.embed(images, boxes)
        ends = np.cumsum([len(b) for b in boxes])
        return np.split(vectors, ends[:-1])


@serve.deployment(ray_actor_options=ACTOR, max_ongoing_requests=IN_FLIGHT)
class ShardReplica:
    def __init__(self, shard_dir: str):
        from meshserve.inference.shards import load_shard

        self.shard = load_shard(Path(shard_dir))

    async def search(self, vectors: np.ndarray, top_k: int) -> tuple[str, np.ndarray, np.ndarray]:
        # a shard search takes well under a millisecond: answered on the loop, as the mesh's indexer does
        ids, scores = self.shard.search(vectors, top_k)
        return self.shard.manifest.shard, ids, scores


@serve.deployment(ray_actor_options=ACTOR, max_ongoing_requests=IN_FLIGHT)
class PhotoSearchIngress:
    def __init__(self, detector: DeploymentHandle, embedder: DeploymentHandle, shards: list[DeploymentHandle]):
        self.detector, self.embedder, self.shards = detector, embedder, shards

    async def __call__(self, image: bytes, top_k: int, min_score: float) -> Answer:
        from meshserve.gateway.model_wire import Detected
        from meshserve.gateway.photo_search import merge_top_k, select_detections

        boxes, labels, scores = await self.detector.remote((image, min_score))
        found = [Detected(tuple(float(v) for v in box), label, float(score))  # type: ignore[arg-type]
                 for box, label, score in zip(boxes, labels, scores, strict=True)]  # fmt: skip
        found = select_detections(found, min_score, (), MAX_DETECTIONS)
        if not found:
            return []
        vectors = await self.embedder.remote((image, np.asarray([d.box for d in found], np.float32)))
        answers = await asyncio.gather(*(shard.search.remote(vectors, top_k) for shard in self.shards))
        merged = merge_top_k(len(found), list(answers), top_k)
        return [(d.label, d.score, d.box, [(m.item_id, m.score) for m in matches])
                for d, matches in zip(found, merged, strict=True)]  # fmt: skip


def photo_search_app(detector_dir: Path, embedder_dir: Path, shard_dirs: Sequence[Path], detectors: int,
                     embedders: int) -> Any:  # fmt: skip
    """The bound graph, replicas as the mesh runs them: `detectors` and `embedders` replicas, one per shard."""
    # serve.deployment turns each class into a Deployment; mypy sees only the class
    detector = DetectorReplica.options(num_replicas=detectors).bind(str(detector_dir))  # type: ignore[attr-defined]
    embedder = EmbedderReplica.options(num_replicas=embedders).bind(str(embedder_dir))  # type: ignore[attr-defined]
    shards = [ShardReplica.options(name=f"ShardReplica-{i}").bind(str(d))  # type: ignore[attr-defined]
              for i, d in enumerate(shard_dirs)]
    return PhotoSearchIngress.bind(detector, embedder, shards)  # type: ignore[attr-defined]
