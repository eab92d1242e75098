"""Photo search in one process, no gRPC: the reference the mesh must match, and the bench baseline.

The same computations as the servers (detect_in_process, embed_in_process, the shard search) and
the same selection and merge as the gateway, called directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from meshserve.gateway.model_wire import Detected
from meshserve.gateway.photo_search import Match, merge_top_k, select_detections


class InProcessSearch:
    def __init__(self, detector_dir: Path, embedder_dir: Path, shard_dirs: Sequence[Path], max_detections: int = 16):
        from meshserve.inference.detector import Detector
        from meshserve.inference.embedder import Embedder
        from meshserve.inference.shards import load_shard

        self.detector = Detector.load(detector_dir)
        self.embedder = Embedder.load(embedder_dir)
        self.shards = [load_shard(d) for d in shard_dirs]
        self.max_detections = max_detections

    def search(self, image: bytes, top_k: int, min_score: float) -> list[tuple[Detected, list[Match]]]:
        from meshserve.servers.detector import detect_in_process
        from meshserve.servers.embedder import embed_in_process

        boxes, labels, scores = detect_in_process(self.detector, image, min_score)
        names = list(self.detector.classes)
        found = [Detected(tuple(float(v) for v in box), names[int(label)], float(score))  # type: ignore[arg-type]
                 for box, label, score in zip(boxes, labels, scores, strict=True) if score > 0]  # fmt: skip
        found = select_detections(found, min_score, (), self.max_detections)
        if not found:
            return []
        vectors = embed_in_process(self.embedder, image, np.asarray([d.box for d in found], np.float32))
        answers = []
        for shard in self.shards:
            ids, shard_scores = shard.search(vectors, top_k)
            answers.append((shard.manifest.shard, ids, shard_scores))
        return list(zip(found, merge_top_k(len(found), answers, top_k), strict=True))
