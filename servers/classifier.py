"""The `classifier` kind: one listing-policy classifier (one violation) scoring listings.

Predict(title, description bytes [N], price f32 [N], category bytes [N]) → score f32 [N]
(probability of the violation) and flagged bool [N] (score ≥ the `threshold` parameter,
default the threshold chosen at training time).
"""

from __future__ import annotations

import argparse

import numpy as np

from meshserve.errors import InvalidInput
from meshserve.servers.model import (
    BYTES,
    Arrays,
    Model,
    Params,
    ParamSpec,
    Signature,
    TensorSpec,
)

MAX_ROWS = 256


class ClassifierModel(Model):
    role = "classifier"

    def __init__(self, model_dir: str):
        from meshserve.training.artifacts import read_card

        self.model_dir = model_dir
        card = read_card(model_dir)
        self.name = card.name or "classifier"
        self.version = card.version
        self.threshold = float(card.metrics.get("threshold", 0.5))
        self.classifier = None
        self.signature = Signature(
            inputs=(
                TensorSpec("title", BYTES, (-1,), max_shape=(MAX_ROWS,), max_element_bytes=1024),
                TensorSpec("description", BYTES, (-1,), max_shape=(MAX_ROWS,),
                           max_element_bytes=32 * 1024),
                TensorSpec("price", "float32", (-1,), max_shape=(MAX_ROWS,),
                           description="listing price (> 0)"),
                TensorSpec("category", BYTES, (-1,), max_shape=(MAX_ROWS,), max_element_bytes=64),
            ),
            outputs=(
                TensorSpec("score", "float32", (-1,), description="probability of the violation"),
                TensorSpec("flagged", "bool", (-1,), description="score >= threshold"),
            ),
            parameters=(
                ParamSpec("threshold", float, self.threshold, min=0.0, max=1.0,
                          description="flag listings scoring at least this"),
            ),
        )  # fmt: skip

    def load(self) -> None:
        from meshserve.training.classifiers import ViolationClassifier

        self.classifier = ViolationClassifier(self.model_dir)

    def warmup(self) -> None:
        self.predict(
            {"title": [b"warm up"], "description": [b"a listing"],
             "price": np.ones(1, np.float32), "category": [b"mug"]},
            {"threshold": self.threshold},
        )  # fmt: skip

    def check(self, inputs: Arrays, params: Params) -> None:
        price = inputs["price"]
        assert isinstance(price, np.ndarray)
        bad = ~np.isfinite(price) | (price <= 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidInput(f"inputs['price'][{i}] = {price[i]!r}; need a finite number > 0")
        for name in ("title", "description", "category"):
            for i, value in enumerate(inputs[name]):
                try:
                    bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInput(f"inputs[{name!r}][{i}]: not valid UTF-8") from None

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        assert self.classifier is not None, "load() first"
        score = self.classifier.score(
            inputs["title"], inputs["description"], inputs["price"], inputs["category"]  # type: ignore[arg-type]
        )
        return {"score": score, "flagged": score >= float(params["threshold"])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="classifier to serve: a violation name (counterfeit, prohibited, contact_info; "
        "from the newest classifier artifact), or a directory models/classifier/<version>/<name> "
        "(default: required unless the newest artifact holds exactly one classifier)",
    )


def build(args: argparse.Namespace) -> Model:
    from meshserve.errors import MeshError
    from meshserve.training.classifiers import resolve_classifier_dir

    try:
        path = resolve_classifier_dir(args.model)
    except MeshError as exc:
        raise ValueError(str(exc)) from exc
    return ClassifierModel(str(path))
