"""One signature per model kind: what its server takes and returns, and what its model card documents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meshserve.wire.images import DEFAULT_LIMITS
from meshserve.wire.signature import BYTES, ParamSpec, Signature, TensorSpec

MAX_IMAGES = 16  # images in one detector or embedder request
MAX_BOXES = 64  # boxes per image in one embedder request
MAX_K = 10_000  # matches per indexer query
MAX_QUERIES = 256  # query vectors in one indexer request, unless the server is told otherwise
CLASSIFIER_MAX_ROWS = 256
SHIPPING_MAX_ROWS = 1024


def detector_signature(
    max_outputs: int, default_score: float, max_image_bytes: int = DEFAULT_LIMITS.max_bytes
) -> Signature:
    """Encoded images → `max_outputs` rows of boxes, scores and labels per image (padding rows
    score 0), and the category names the labels index."""
    k = max_outputs
    return Signature(
        inputs=(
            TensorSpec("image", BYTES, (-1,), max_shape=(MAX_IMAGES,),
                       max_element_bytes=max_image_bytes, description="encoded JPEG/PNG/WebP"),
        ),
        outputs=(
            TensorSpec("boxes", "float32", (-1, k, 4), description="pixels, upright image"),
            TensorSpec("scores", "float32", (-1, k), description="0 marks padding rows"),
            TensorSpec("labels", "int64", (-1, k), description="index into label_names"),
            TensorSpec("label_names", BYTES, (-1,), description="category names"),
        ),
        parameters=(
            ParamSpec("min_score", float, default_score, min=0.0, max=1.0,
                      description="drop detections scoring below this"),
        ),
    )  # fmt: skip


def embedder_signature(dim: int, max_image_bytes: int = DEFAULT_LIMITS.max_bytes) -> Signature:
    """Encoded images and pixel boxes on each → one unit vector of length `dim` per box."""
    return Signature(
        inputs=(
            TensorSpec("image", BYTES, (-1,), max_shape=(MAX_IMAGES,),
                       max_element_bytes=max_image_bytes, description="encoded JPEG/PNG/WebP"),
            TensorSpec("boxes", "float32", (-1, -1, 4), max_shape=(MAX_IMAGES, MAX_BOXES, 4),
                       description="pixel boxes x_min, y_min, x_max, y_max per image"),
        ),
        outputs=(
            TensorSpec("embeddings", "float32", (-1, -1, dim), description="unit-length vector per box"),
        ),
    )  # fmt: skip


def indexer_signature(dim: int, max_queries: int = MAX_QUERIES) -> Signature:
    """Query vectors of length `dim` → the k nearest catalogue items of one shard, best first."""
    return Signature(
        inputs=(
            TensorSpec("queries", "float32", (-1, dim), max_shape=(max_queries, dim),
                       description="L2-normalised query vectors of the shard's embedder version"),
        ),
        outputs=(
            TensorSpec("item_ids", "int64", (-1, -1), description="catalogue item ids, best first"),
            TensorSpec("scores", "float32", (-1, -1), description="similarity, higher is closer"),
        ),
        parameters=(
            ParamSpec("k", int, 10, min=1, max=MAX_K, description="matches per query"),
            ParamSpec("embedder_version", str, "",
                      description="version of the embedder that made the queries (checked when set)"),
        ),
    )  # fmt: skip


def classifier_signature(threshold: float) -> Signature:
    """Listings → the probability of one violation and whether it reaches `threshold`."""
    rows = CLASSIFIER_MAX_ROWS
    return Signature(
        inputs=(
            TensorSpec("title", BYTES, (-1,), max_shape=(rows,), max_element_bytes=1024),
            TensorSpec("description", BYTES, (-1,), max_shape=(rows,), max_element_bytes=32 * 1024),
            TensorSpec("price", "float32", (-1,), max_shape=(rows,), description="listing price (> 0)"),
            TensorSpec("category", BYTES, (-1,), max_shape=(rows,), max_element_bytes=64),
        ),
        outputs=(
            TensorSpec("score", "float32", (-1,), description="probability of the violation"),
            TensorSpec("flagged", "bool", (-1,), description="score >= threshold"),
        ),
        parameters=(
            ParamSpec("threshold", float, threshold, min=0.0, max=1.0,
                      description="flag listings scoring at least this"),
        ),
    )  # fmt: skip


def shipping_signature(classes: Sequence[str]) -> Signature:
    """Parcel dimensions, weight, category (and title) → a size class and each class's probability."""
    rows = SHIPPING_MAX_ROWS
    return Signature(
        inputs=(
            TensorSpec("dims", "float32", (-1, 3), max_shape=(rows, 3),
                       description="width, height, depth in cm (> 0)"),
            TensorSpec("weight_kg", "float32", (-1,), max_shape=(rows,)),
            TensorSpec("category", BYTES, (-1,), max_shape=(rows,), max_element_bytes=64),
            TensorSpec("title", BYTES, (-1,), max_shape=(rows,), max_element_bytes=1024, optional=True),
        ),
        outputs=(
            TensorSpec("size", BYTES, (-1,), description="; ".join(classes)),
            TensorSpec("probs", "float32", (-1, len(classes) or -1)),
        ),
    )  # fmt: skip


def card_signature(signature: Signature) -> dict[str, Any]:
    """A signature as a model card writes it: inputs and outputs with name, dtype, shape (-1: any
    size) and description, plus their bounds when set; parameters with name, type and default."""
    return {
        "inputs": [_tensor(spec) for spec in signature.inputs],
        "outputs": [_tensor(spec) for spec in signature.outputs],
        "parameters": [_parameter(spec) for spec in signature.parameters],
    }


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}
    if spec.max_shape:
        out["max_shape"] = list(spec.max_shape)
    if spec.max_element_bytes:
        out["max_element_bytes"] = spec.max_element_bytes
    if spec.optional:
        out["optional"] = True
    out["description"] = spec.description
    return out


def _parameter(spec: ParamSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name, "type": spec.kind.__name__, "default": spec.default}
    if spec.min is not None:
        out["min"] = spec.min
    if spec.max is not None:
        out["max"] = spec.max
    out["description"] = spec.description
    return out
