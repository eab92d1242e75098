"""The `detector` kind: product boxes, category labels and scores for encoded images.

Predict(image bytes [N]; min_score) → boxes f32 [N, K, 4] (pixels x_min, y_min, x_max, y_max of
the upright image), scores f32 [N, K], labels i64 [N, K], label_names bytes [C]. K is the
model's max detections times the categories it may report per box (a box whose category is
in doubt comes once per likely category); rows past an image's detections are padding with
score 0. Undecodable images, decompression bombs and the like are INVALID_ARGUMENT naming the
problem.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from meshserve.inference.vocabulary import CATEGORY_NAMES
from meshserve.servers.embedder import decode_rows
from meshserve.servers.model import Model
from meshserve.wire.images import DEFAULT_LIMITS, ImageLimits, load_decoders
from meshserve.wire.signature import Arrays, Params
from meshserve.wire.signatures import detector_signature


def _detector_config(model_dir: str) -> dict:
    import json
    from pathlib import Path

    from meshserve.inference.detector import CONFIG_FILE

    return dict(json.loads((Path(model_dir) / CONFIG_FILE).read_text()))


def pad_detections(
    boxes: Sequence[np.ndarray], labels: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image detections → fixed [N, K] arrays, padding with score 0 (best first)."""
    n = len(boxes)
    out_b = np.zeros((n, k, 4), np.float32)
    out_l = np.zeros((n, k), np.int64)
    out_s = np.zeros((n, k), np.float32)
    for i, (b, lab, s) in enumerate(zip(boxes, labels, scores, strict=True)):
        order = np.argsort(-s, kind="stable")[:k]
        m = len(order)
        out_b[i, :m], out_l[i, :m], out_s[i, :m] = b[order], lab[order], s[order]
    return out_b, out_l, out_s


class DetectorModel(Model):
    role = "detector"

    def __init__(self, model_dir: str, limits: ImageLimits = DEFAULT_LIMITS):
        from meshserve.inference.artifacts import read_card
        from meshserve.inference.detector import max_outputs

        self.model_dir = model_dir
        self.limits = limits
        card = read_card(model_dir)
        self.name = card.name or "detector"
        self.version = card.version
        cfg = _detector_config(model_dir)
        self.max_detections = max_outputs(cfg)
        self.default_score = float(cfg["score_threshold"])
        self.label_names = [name.encode() for name in CATEGORY_NAMES[: int(cfg["n_classes"])]]
        self.detector: Any = None
        self.signature = detector_signature(self.max_detections, self.default_score, limits.max_bytes)

    def load(self) -> None:
        from meshserve.inference.detector import Detector

        loaded = Detector.load(self.model_dir)
        loaded.version = self.version
        self.detector = loaded

    def warmup(self) -> None:
        load_decoders()  # else the first request's check() pays PIL's plugin imports
        decoded = [np.full((96, 96, 3), 127, np.uint8)]  # as check() leaves a request's images
        self.predict({"image": decoded}, {"min_score": self.default_score})  # type: ignore[dict-item]

    check_off_loop = True  # decoding an image costs milliseconds: keep it off the event loop

    def check(self, inputs: Arrays, params: Params) -> None:
        # Decoded before queueing, so one bad image fails only its own request, never a batch
        # it would have joined. The decoded arrays replace the bytes.
        inputs["image"] = decode_rows(inputs, self.limits)  # type: ignore[assignment]

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        assert self.detector is not None, "load() first"
        images = decode_rows(inputs, self.limits)
        boxes, labels, scores = self.detector.detect(images, float(params["min_score"]))
        b, lab, s = pad_detections(boxes, labels, scores, self.max_detections)
        return {"boxes": b, "scores": s, "labels": lab, "label_names": list(self.label_names)}

    def unbatch(self, outputs: Arrays, sizes: Sequence[int]) -> list[Arrays]:
        names = outputs.pop("label_names")
        parts = super().unbatch(outputs, sizes)
        for part in parts:
            part["label_names"] = names
        return parts


def detect_in_process(detector, image: bytes, min_score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """What the server computes for one image (for tests and offline use), padded to K."""
    from meshserve.inference.detector import max_outputs
    from meshserve.wire.images import decode_image

    boxes, labels, scores = detector.detect([decode_image(image)], min_score)
    b, lab, s = pad_detections(boxes, labels, scores, max_outputs(asdict(detector.cfg)))
    return b[0], lab[0], s[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="artifact directory models/detector/<version> or a version id "
        "(default: the newest under $MESHSERVE_HOME)",
    )


def build(args: argparse.Namespace) -> Model:
    from meshserve.errors import MeshError
    from meshserve.inference.artifacts import resolve_model_dir

    try:
        path = resolve_model_dir("detector", args.model)
    except MeshError as exc:
        raise ValueError(str(exc)) from exc
    return DetectorModel(str(path))
