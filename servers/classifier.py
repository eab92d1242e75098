"""The `classifier` kind: one listing-policy classifier (one violation) scoring listings.

Predict(title, description bytes [N], price f32 [N], category bytes [N]) → score f32 [N]
(probability of the violation) and flagged bool [N] (score ≥ the `threshold` parameter,
default the threshold chosen at training time).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from meshserve.errors import InvalidInput
from meshserve.servers.model import Model
from meshserve.wire.signature import Arrays, Params
from meshserve.wire.signatures import classifier_signature


class ClassifierModel(Model):
    role = "classifier"

    def __init__(self, model_dir: str):
        from meshserve.inference.artifacts import read_card

        self.model_dir = model_dir
        card = read_card(model_dir)
        self.name = card.name or "classifier"
        self.version = card.version
        self.threshold = float(card.metrics.get("threshold", 0.5))
        self.classifier: Any = None
        self.signature = classifier_signature(self.threshold)

    def load(self) -> None:
        from meshserve.inference.classifiers import ViolationClassifier

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
    from meshserve.inference.classifiers import resolve_classifier_dir

    try:
        path = resolve_classifier_dir(args.model)
    except MeshError as exc:
        raise ValueError(str(exc)) from exc
    return ClassifierModel(str(path))
