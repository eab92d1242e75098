"""How the guard speaks Predict to the listing models; a reply of the wrong shape or with a non-finite
score is a BadReply (that model's verdict becomes ERROR), never a crash of the Check."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshserve.gateway.calls import ServiceCaller
from meshserve.gateway.model_wire import BadReply
from meshserve.v1 import prediction_pb2
from meshserve.wire import tensors


@dataclass(frozen=True)
class Answer:
    version: str
    score: float
    label: str = ""


def _output(reply: prediction_pb2.PredictResponse, name: str, stage: str) -> np.ndarray | list:
    if name not in reply.outputs:
        raise BadReply(f"{stage}: reply lacks output {name!r} (has {sorted(reply.outputs)})")
    try:
        return tensors.array_from(reply.outputs[name])
    except Exception as exc:  # noqa: BLE001 - any undecodable tensor is the model's fault
        raise BadReply(f"{stage}: output {name!r} does not decode: {exc}") from None


def _scores(value: np.ndarray | list, name: str, stage: str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise BadReply(f"{stage}: output {name!r} is not a float tensor")
    if value.shape != shape:
        raise BadReply(f"{stage}: output {name!r} has shape {list(value.shape)}, expected {list(shape)}")
    if value.size and not (value.min() >= 0 and value.max() <= 1):  # NaN fails both comparisons
        raise BadReply(f"{stage}: output {name!r} holds a value outside [0, 1] (NaN or out of range)")
    return value


def classifier_request(title: bytes, description: bytes, price: float,
                       category: bytes) -> prediction_pb2.PredictRequest:  # fmt: skip
    """Classifier Predict{title, description, category: BYTES[1], price: f32[1]}: the same for every classifier."""
    request = prediction_pb2.PredictRequest()
    request.inputs["title"].CopyFrom(tensors.tensor_from([title]))
    request.inputs["description"].CopyFrom(tensors.tensor_from([description]))
    request.inputs["price"].CopyFrom(tensors.tensor_from(np.array([price], np.float32)))
    request.inputs["category"].CopyFrom(tensors.tensor_from([category]))
    return request


async def classify(caller: ServiceCaller, request: prediction_pb2.PredictRequest, deadline: float) -> Answer:
    """A classifier_request() → score f32[1] in [0, 1]."""
    reply, _ = await caller.predict(request, deadline)
    score = _scores(_output(reply, "score", caller.stage), "score", caller.stage, (1,))
    return Answer(reply.model_version, float(score[0]))


def shipping_request(dims: tuple[float, float, float], weight_kg: float, category: bytes,
                     title: bytes) -> prediction_pb2.PredictRequest:  # fmt: skip
    """Shipping Predict{dims f32[1,3], weight_kg f32[1], category, title}."""
    request = prediction_pb2.PredictRequest()
    request.inputs["dims"].CopyFrom(tensors.tensor_from(np.array([dims], np.float32)))
    request.inputs["weight_kg"].CopyFrom(tensors.tensor_from(np.array([weight_kg], np.float32)))
    request.inputs["category"].CopyFrom(tensors.tensor_from([category]))
    request.inputs["title"].CopyFrom(tensors.tensor_from([title]))
    return request


async def estimate_shipping(caller: ServiceCaller, request: prediction_pb2.PredictRequest, deadline: float) -> Answer:
    """A shipping_request() → size BYTES[1], probs f32[1,C]."""
    reply, _ = await caller.predict(request, deadline)
    size = _output(reply, "size", caller.stage)
    probs = _output(reply, "probs", caller.stage)
    if not isinstance(probs, np.ndarray) or probs.ndim != 2 or probs.shape[0] != 1 or probs.shape[1] < 1:
        raise BadReply(f"{caller.stage}: output 'probs' has shape {list(np.shape(probs))}, expected [1, C]")
    probs = _scores(probs, "probs", caller.stage, probs.shape)
    if isinstance(size, np.ndarray) or len(size) != 1:
        raise BadReply(f"{caller.stage}: output 'size' must hold one size class")
    return Answer(reply.model_version, float(probs.max()), bytes(size[0]).decode("utf-8", errors="replace"))


def detector_request(images: list[bytes]) -> prediction_pb2.PredictRequest:
    """Detector Predict{image: BYTES[n]}."""
    request = prediction_pb2.PredictRequest()
    request.inputs["image"].CopyFrom(tensors.tensor_from(images))
    return request


async def detect_categories(caller: ServiceCaller, request: prediction_pb2.PredictRequest, n_images: int,
                            deadline: float, top_k: int) -> tuple[str, list[tuple[str, float]]]:  # fmt: skip
    """A detector_request() of `n_images` photos → the categories it saw on any photo, best score first."""
    reply, _ = await caller.predict(request, deadline)
    scores = _output(reply, "scores", caller.stage)
    labels = _output(reply, "labels", caller.stage)
    names = _output(reply, "label_names", caller.stage)
    if not isinstance(scores, np.ndarray) or scores.ndim != 2 or scores.shape[0] != n_images:
        raise BadReply(f"{caller.stage}: output 'scores' has shape {list(np.shape(scores))}, "
                       f"expected [{n_images}, K]")
    scores = _scores(scores, "scores", caller.stage, scores.shape)
    if not isinstance(labels, np.ndarray) or labels.shape != scores.shape or isinstance(names, np.ndarray):
        raise BadReply(f"{caller.stage}: labels {list(np.shape(labels))} do not match scores {list(scores.shape)}")
    best: dict[str, float] = {}
    for label, score in zip(labels.reshape(-1), scores.reshape(-1), strict=True):
        if score <= 0:  # padding rows
            continue
        i = int(label)
        name = bytes(names[i]).decode("utf-8", errors="replace") if 0 <= i < len(names) else str(i)
        best[name] = max(best.get(name, 0.0), float(score))
    ranked = sorted(best.items(), key=lambda kv: -kv[1])[:top_k]
    return reply.model_version, ranked
