"""Training the shipping-size estimator: its reference set from the training split, evaluated on held-out items."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from meshserve.inference import artifacts
from meshserve.inference.shipping import (
    KIND,
    ShippingConfig,
    ShippingEstimator,
    ShippingPrep,
    size_features,
)
from meshserve.inference.vocabulary import SHIPPING_SIZES
from meshserve.training.catalogue import Item
from meshserve.training.classifiers import split_items
from meshserve.wire.signatures import card_signature, shipping_signature

DEFAULT_CONFIG = ShippingConfig()


def _item_columns(items: Sequence[Item]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    dims = np.array([[i.width_cm, i.height_cm, i.depth_cm] for i in items], dtype=np.float64)
    weight = np.array([i.weight_kg for i in items], dtype=np.float64)
    return dims, weight, [i.category for i in items], [i.title for i in items]


def fit_estimator(items: Sequence[Item], config: ShippingConfig) -> ShippingEstimator:
    """An estimator whose reference listings are `items`, standardised by their own statistics."""
    dims, weight, cats, titles = _item_columns(items)
    numeric = size_features(dims[:, 0], dims[:, 1], dims[:, 2], weight)
    prep = ShippingPrep(tuple(numeric.mean(0).tolist()), tuple((numeric.std(0) + 1e-6).tolist()))
    feats = prep.features(dims, weight, cats, titles, config)
    labels = np.array([SHIPPING_SIZES.index(i.shipping_size) for i in items])
    return ShippingEstimator(feats, labels, prep, config)


def evaluate(estimator: ShippingEstimator, test: Sequence[Item], train: Sequence[Item]) -> dict[str, Any]:
    dims, weight, cats, titles = _item_columns(test)
    predicted = estimator.predict(dims, weight, cats, titles)
    truth = [i.shipping_size for i in test]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    majority, _ = Counter(i.shipping_size for i in train).most_common(1)[0]
    baseline = float(np.mean([t == majority for t in truth]))
    return {
        "accuracy": round(accuracy, 4),
        "majority_class": majority,
        "majority_baseline_accuracy": round(baseline, 4),
        "test_items": len(test),
        "reference_items": len(train),
    }


def train_shipping(
    items: Sequence[Item],
    *,
    config: ShippingConfig = DEFAULT_CONFIG,
    data_seed: int = 0,
    home: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Fit on the training split, evaluate on the held-out split, write the artifact.

    The served model's reference set is the training split only, so the card's accuracy is
    what a new listing sees."""
    watch = artifacts.Stopwatch()
    train, test = split_items(items, config.test_fraction, config.seed)
    estimator = fit_estimator(train, config)
    metrics = evaluate(estimator, test, train)
    version, root = artifacts.new_version(KIND, home)
    estimator.version = version
    estimator.save(root)
    artifacts.write_card(
        root,
        artifacts.ModelCard(
            kind=KIND, version=version, name="shipping-size", data_seed=data_seed, metrics=metrics,
            signature=card_signature(shipping_signature(SHIPPING_SIZES)),
            training_time_s=round(watch.elapsed, 2), config=asdict(config),
            extra={"classes": list(SHIPPING_SIZES)},
        ),
    )
    return root, metrics
