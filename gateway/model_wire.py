"""How the gateway speaks Predict to each model kind: numpy and domain values in, protobuf out, and back.

One function per stage, so photo_search.py reads as the flow and never touches a tensor message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from meshserve.errors import MeshError
from meshserve.gateway.calls import CallStats, ServiceCaller
from meshserve.v1 import prediction_pb2, tensor_pb2
from meshserve.wire import tensors


@dataclass(frozen=True)
class Detected:
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in pixels of the original
    label: str
    score: float


class BadReply(MeshError):
    """A model answered with outputs the gateway cannot read (a version skew or a bug)."""


def _output(reply: prediction_pb2.PredictResponse, name: str, stage: str) -> np.ndarray:
    return _tensor(reply.outputs, name, stage)


def _tensor(outputs: Mapping[str, tensor_pb2.Tensor], name: str, stage: str) -> np.ndarray:
    if name not in outputs:
        raise BadReply(f"{stage}: reply lacks output {name!r} (has {sorted(outputs)})")
    value = tensors.array_from(outputs[name])
    if not isinstance(value, np.ndarray):
        raise BadReply(f"{stage}: output {name!r} is not numeric")
    return value


def _set_param(request: prediction_pb2.PredictRequest, name: str, value: int | float | str) -> None:
    param = request.parameters[name]
    if isinstance(value, str):
        param.string_value = value
    elif isinstance(value, int):
        param.int_value = value
    else:
        param.double_value = value


async def detect(
    caller: ServiceCaller, image: bytes, min_score: float, deadline: float
) -> tuple[list[Detected], CallStats]:
    """Detector Predict{image: BYTES[1]} → boxes f32[1,K,4], scores f32[1,K], labels (class names)."""
    request = prediction_pb2.PredictRequest()
    request.inputs["image"].CopyFrom(tensors.tensor_from([image]))
    _set_param(request, "min_score", float(min_score))
    reply, stats = await caller.predict(request, deadline)
    boxes = _output(reply, "boxes", caller.stage).reshape(-1, 4)
    scores = _output(reply, "scores", caller.stage).reshape(-1)
    label_ids = _output(reply, "labels", caller.stage).reshape(-1)
    names = list(tensors.array_from(reply.outputs["label_names"])) if "label_names" in reply.outputs else []
    if not len(boxes) == len(scores) == len(label_ids):
        raise BadReply(f"{caller.stage}: {len(boxes)} boxes, {len(scores)} scores, {len(label_ids)} labels")
    found = []
    for box, score, label in zip(boxes, scores, label_ids, strict=True):
        if score <= 0:  # padding rows
            continue
        name = names[int(label)].decode() if 0 <= int(label) < len(names) else str(int(label))
        found.append(Detected(tuple(float(v) for v in box), name, float(score)))  # type: ignore[arg-type]
    return found, stats


async def embed(
    caller: ServiceCaller, image: bytes, boxes: np.ndarray, deadline: float
) -> tuple[np.ndarray, str, CallStats]:
    """Embedder Predict{image: BYTES[1], boxes: f32[1,M,4]} → embeddings f32[1,M,D] (unit length)."""
    request = prediction_pb2.PredictRequest()
    request.inputs["image"].CopyFrom(tensors.tensor_from([image]))
    request.inputs["boxes"].CopyFrom(tensors.tensor_from(boxes.astype(np.float32).reshape(1, -1, 4)))
    reply, stats = await caller.predict(request, deadline)
    vectors = _output(reply, "embeddings", caller.stage)
    vectors = vectors.reshape(len(boxes), -1)
    return np.ascontiguousarray(vectors, dtype=np.float32), reply.model_version, stats


@dataclass(frozen=True)
class ShardFailure:
    """One shard of a grouped indexer call that has no answer: the status it would have had alone."""

    code: grpc.StatusCode
    message: str


ShardOutcome = tuple[np.ndarray, np.ndarray] | ShardFailure
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def shards_request(vectors: np.ndarray, k: int, embedder_version: str,
                   shards: Sequence[str]) -> prediction_pb2.PredictRequest:  # fmt: skip
    """Indexer Predict{queries: f32[M,D]; k, embedder_version; shards} → one ShardResult per shard."""
    request = prediction_pb2.PredictRequest(shards=shards)
    tensors.encode_tensor(vectors, request.inputs["queries"])
    _set_param(request, "k", int(k))
    _set_param(request, "embedder_version", embedder_version)
    return request


def shard_outcomes(reply: prediction_pb2.PredictResponse, shards: Sequence[str], n_queries: int,
                   stage: str) -> dict[str, ShardOutcome]:  # fmt: skip
    """Each asked shard's (item_ids i64[M,k'], scores f32[M,k']) or failure, from a grouped reply. A
    one-shard server that predates grouped calls answers in `outputs`: that is its shard's answer."""
    if not reply.shard_results and len(shards) == 1:
        return {shards[0]: _shard_answer(reply.outputs, n_queries, stage)}
    outcomes: dict[str, ShardOutcome] = {}
    for result in reply.shard_results:
        if result.shard not in shards or result.shard in outcomes:
            continue
        if result.code:
            code = _STATUS_BY_NUMBER.get(result.code, grpc.StatusCode.UNKNOWN)
            outcomes[result.shard] = ShardFailure(code, f"{stage}: shard {result.shard}: {result.message}")
        else:
            outcomes[result.shard] = _shard_answer(result.outputs, n_queries, f"{stage}: shard {result.shard}")
    for shard in shards:
        if shard not in outcomes:
            outcomes[shard] = ShardFailure(grpc.StatusCode.UNKNOWN, f"{stage}: reply has no result for shard {shard}")
    return outcomes


def _shard_answer(outputs: Mapping[str, tensor_pb2.Tensor], n_queries: int, stage: str) -> ShardOutcome:
    try:
        ids, scores = _tensor(outputs, "item_ids", stage), _tensor(outputs, "scores", stage)
    except (MeshError, ValueError) as exc:
        return ShardFailure(grpc.StatusCode.UNKNOWN, str(exc))
    if ids.shape != scores.shape or ids.ndim != 2 or ids.shape[0] != n_queries:
        return ShardFailure(grpc.StatusCode.UNKNOWN,
                            f"{stage}: item_ids {ids.shape} and scores {scores.shape} for {n_queries} queries")
    return ids, scores
