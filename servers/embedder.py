"""The `embedder` kind: one L2-normalised vector per box of an encoded image.

Predict(image bytes [N], boxes f32 [N, M, 4] pixels x_min y_min x_max y_max of the upright
image) → embeddings f32 [N, M, D]. The image travels once for all its boxes. Boxes partly
outside the image are clipped; degenerate or wholly-outside boxes and undecodable images are
INVALID_ARGUMENT naming the problem.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from meshserve.servers.model import Model
from meshserve.wire.images import DEFAULT_LIMITS, ImageLimits, clip_boxes, decode_image, load_decoders
from meshserve.wire.signature import Arrays, Params
from meshserve.wire.signatures import embedder_signature


def decode_rows(inputs: Arrays, limits: ImageLimits) -> list[np.ndarray]:
    """Decode every image of a request, naming the row of a bad one."""
    from meshserve.errors import InvalidInput

    images = []
    for i, data in enumerate(inputs["image"]):
        if isinstance(data, np.ndarray) and data.ndim == 3:
            images.append(data)  # decoded already by check()
            continue
        try:
            images.append(decode_image(data, limits))
        except InvalidInput as exc:
            raise InvalidInput(f"inputs['image'][{i}]: {exc}") from None
    return images


def _embedder_dim(model_dir: str) -> int:
    import json
    from pathlib import Path

    from meshserve.inference.embedder import CONFIG_FILE

    return int(json.loads((Path(model_dir) / CONFIG_FILE).read_text())["dim"])


class EmbedderModel(Model):
    role = "embedder"

    def __init__(self, model_dir: str, limits: ImageLimits = DEFAULT_LIMITS):
        from meshserve.inference.artifacts import read_card

        self.model_dir = model_dir
        self.limits = limits
        card = read_card(model_dir)
        self.name = card.name or "embedder"
        self.version = card.version
        self.dim = _embedder_dim(model_dir)
        self.embedder: Any = None
        self.signature = embedder_signature(self.dim, limits.max_bytes)

    def load(self) -> None:
        from meshserve.inference.embedder import Embedder

        loaded = Embedder.load(self.model_dir)
        loaded.version = self.version
        self.embedder = loaded

    def warmup(self) -> None:
        load_decoders()  # else the first request's check() pays PIL's plugin imports
        decoded = [np.full((64, 64, 3), 127, np.uint8)]  # as check() leaves a request's images
        self.predict({"image": decoded, "boxes": np.array([[[8, 8, 56, 56]]], np.float32)}, {})  # type: ignore[dict-item]

    check_off_loop = True  # decoding an image costs milliseconds: keep it off the event loop

    def check(self, inputs: Arrays, params: Params) -> None:
        # Decoded here, before queueing, so one bad image fails only its own request and never
        # a batch it would have been merged into. The decoded arrays replace the bytes.
        images = decode_rows(inputs, self.limits)
        boxes = inputs["boxes"]
        assert isinstance(boxes, np.ndarray)
        clipped = np.empty_like(boxes)
        from meshserve.errors import InvalidInput

        for i, img in enumerate(images):
            try:
                clipped[i] = clip_boxes(boxes[i], img.shape[1], img.shape[0], limits=self.limits)
            except InvalidInput as exc:
                raise InvalidInput(f"inputs['boxes'][{i}]: {exc}") from None
        inputs["image"] = images  # type: ignore[assignment]
        inputs["boxes"] = clipped

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        assert self.embedder is not None, "load() first"
        images = decode_rows(inputs, self.limits)
        boxes = inputs["boxes"]
        vectors = self.embedder.embed(images, list(boxes))
        if isinstance(boxes, np.ndarray):
            return {"embeddings": vectors.reshape(boxes.shape[0], boxes.shape[1], -1)}
        # A merged batch (see batch()): one [M_i, D] array per photo, M_i its box count.
        counts = np.cumsum([len(per_image) for per_image in boxes])[:-1]
        return {"embeddings": np.split(vectors, counts)}  # type: ignore[dict-item]

    # Photos with different box counts share one forward pass: every box becomes a crop, and the
    # crops of all merged requests go through the network as one stack.

    def batch_key(self, inputs: Arrays, params: Params) -> Any:
        return tuple(sorted(params.items()))

    def batch(self, requests: Sequence[Arrays]) -> Arrays:
        if len(requests) == 1:
            return requests[0]
        images = [image for request in requests for image in request["image"]]
        boxes = [per_image for request in requests for per_image in request["boxes"]]  # [M_i, 4] each
        return {"image": images, "boxes": boxes}  # type: ignore[dict-item]

    def unbatch(self, outputs: Arrays, sizes: Sequence[int]) -> list[Arrays]:
        if len(sizes) == 1:
            return [outputs]
        per_image = outputs["embeddings"]
        parts: list[Arrays] = []
        start = 0
        for size in sizes:  # a request's photos share its box count M: stack them back to [n, M, D]
            parts.append({"embeddings": np.stack(per_image[start : start + size])})  # type: ignore[arg-type]
            start += size
        return parts


def embed_in_process(embedder, image: bytes, boxes: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """What the server computes for one image, for tests and offline use: f32 [M, D]."""
    img = decode_image(image)
    return embedder.embed([img], [clip_boxes(boxes, img.shape[1], img.shape[0])])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="artifact directory models/embedder/<version> or a version id "
        "(default: the newest under $MESHSERVE_HOME)",
    )


def build(args: argparse.Namespace) -> Model:
    from meshserve.errors import MeshError
    from meshserve.inference.artifacts import resolve_model_dir

    try:
        path = resolve_model_dir("embedder", args.model)
    except MeshError as exc:
        raise ValueError(str(exc)) from exc
    return EmbedderModel(str(path))
