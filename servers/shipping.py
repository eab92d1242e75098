"""The `shipping` kind: the shipping-size estimator (k-nearest neighbours over past listings).

Predict(dims f32 [N, 3] cm, weight_kg f32 [N], category bytes [N], title bytes [N] optional)
→ size bytes [N] (small / medium / large / oversize) and probs f32 [N, 4] in that order.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from meshserve.errors import InvalidInput
from meshserve.servers.model import Model
from meshserve.wire.signature import Arrays, Params
from meshserve.wire.signatures import shipping_signature


class ShippingModel(Model):
    role = "shipping"

    def __init__(self, model_dir: str):
        from meshserve.inference.artifacts import read_card

        self.model_dir = model_dir
        card = read_card(model_dir)
        self.name = card.name or "shipping-size"
        self.version = card.version
        self.classes = list(card.extra.get("classes", ()))
        self.estimator: Any = None
        self.signature = shipping_signature(self.classes)

    def load(self) -> None:
        from meshserve.inference.shipping import ShippingEstimator

        self.estimator = ShippingEstimator.load(self.model_dir)

    def warmup(self) -> None:
        self.predict(
            {"dims": np.ones((1, 3), np.float32), "weight_kg": np.ones(1, np.float32),
             "category": [b"mug"]},
            {},
        )  # fmt: skip

    def check(self, inputs: Arrays, params: Params) -> None:
        for name in ("dims", "weight_kg"):
            value = inputs[name]
            assert isinstance(value, np.ndarray)
            bad = ~np.isfinite(value) | (value <= 0)
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise InvalidInput(
                    f"inputs[{name!r}]{list(where)} = {value[where]!r}; need a finite number > 0"
                )

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        assert self.estimator is not None, "load() first"
        probs = self.estimator.predict_proba(
            inputs["dims"], inputs["weight_kg"], inputs["category"], inputs.get("title")  # type: ignore[arg-type]
        )
        names = [self.classes[i].encode() for i in probs.argmax(axis=1)]
        return {"size": names, "probs": probs}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="artifact directory models/shipping/<version> or a version id "
        "(default: the newest under $MESHSERVE_HOME)",
    )


def build(args: argparse.Namespace) -> Model:
    from meshserve.errors import MeshError
    from meshserve.inference.artifacts import resolve_model_dir

    try:
        path = resolve_model_dir("shipping", args.model)
    except MeshError as exc:
        raise ValueError(str(exc)) from exc
    return ShippingModel(str(path))
