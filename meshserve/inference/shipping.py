"""The shipping-size estimator at inference: k-nearest neighbours over reference listings' size, category and words."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshserve.errors import InvalidInput
from meshserve.inference.artifacts import read_card
from meshserve.inference.features import as_text, finite_column, ngram_ids, one_hot
from meshserve.inference.vocabulary import CATEGORY_NAMES, SHIPPING_SIZES

KIND = "shipping"
REFERENCE = "reference.npz"
PREP = "prep.json"
TEXT_BUCKETS = 64


@dataclass(frozen=True)
class ShippingConfig:
    k: int = 7
    category_weight: float = 0.5  # distance a category mismatch adds, in standardised units
    text_weight: float = 0.05  # how much the listing's words pull neighbours together
    test_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be ≥ 1")


def size_features(width: np.ndarray, height: np.ndarray, depth: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Log-scale size features: each side sorted (orientation is arbitrary), volume, weight."""
    sides = np.sort(np.stack([width, height, depth], axis=1), axis=1)[:, ::-1]
    volume = width * height * depth
    return np.log(np.concatenate([sides, volume[:, None], weight[:, None]], axis=1))


def _text_vectors(texts: Sequence[str]) -> np.ndarray:
    out = np.zeros((len(texts), TEXT_BUCKETS), dtype=np.float64)
    for row, text in enumerate(texts):
        ids = ngram_ids(text, TEXT_BUCKETS, 1)
        if ids:
            out[row, ids] = 1.0 / np.sqrt(len(ids))
    return out


@dataclass(frozen=True)
class ShippingPrep:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def features(
        self,
        dims: np.ndarray,
        weight: np.ndarray,
        categories: Sequence[str],
        titles: Sequence[str],
        config: ShippingConfig,
    ) -> np.ndarray:
        numeric = size_features(dims[:, 0], dims[:, 1], dims[:, 2], weight)
        numeric = (numeric - np.asarray(self.mean)) / np.asarray(self.std)
        cat = one_hot(categories, CATEGORY_NAMES, "category") * (config.category_weight / np.sqrt(2))
        text = _text_vectors(titles) * config.text_weight
        return np.concatenate([numeric, cat, text], axis=1).astype(np.float32)


class ShippingEstimator:
    """kNN over reference listings; votes weighted by inverse distance."""

    def __init__(self, reference: np.ndarray, labels: np.ndarray, prep: ShippingPrep,
                 config: ShippingConfig, version: str = ""):
        self.reference = reference.astype(np.float32)
        self.labels = labels.astype(np.int64)
        self.prep = prep
        self.config = config
        self.version = version
        reference64 = self.reference.astype(np.float64)
        self._ref_sq = (reference64**2).sum(axis=1)
        self._ref_t = np.ascontiguousarray(reference64.T)  # what each query is multiplied with

    def predict_proba(
        self,
        dims: np.ndarray,
        weight: np.ndarray | Sequence[float],
        categories: Sequence[bytes | str],
        titles: Sequence[bytes | str] | None = None,
    ) -> np.ndarray:
        """Class probabilities float32 [n, len(SHIPPING_SIZES)] for listings' dims (cm) and kg."""
        dims = np.asarray(dims, dtype=np.float64)
        if dims.ndim != 2 or dims.shape[1] != 3:
            raise InvalidInput(f"dims must have shape [n, 3] (width, height, depth cm), got {list(dims.shape)}")
        n = dims.shape[0]
        finite_column(dims.reshape(-1), "dims", positive=True)
        kg = finite_column(weight, "weight_kg", positive=True)
        if len(kg) != n or len(categories) != n or (titles is not None and len(titles) != n):
            raise InvalidInput("dims, weight_kg, category (and title) need the same batch size")
        cats = [as_text(c, "category") for c in categories]
        words = [as_text(t, "title") for t in titles] if titles is not None else [""] * n
        query = self.prep.features(dims, kg, cats, words, self.config).astype(np.float64)
        # Squared distances by the expansion |q|² - 2q·r + |r|², in float64 for stable ties.
        d2 = (query**2).sum(1)[:, None] - 2.0 * query @ self._ref_t
        d2 = np.maximum(d2 + self._ref_sq[None, :], 0.0)
        k = min(self.config.k, len(self.reference))
        nearest = np.argsort(d2, axis=1, kind="stable")[:, :k]
        votes = 1.0 / (np.sqrt(np.take_along_axis(d2, nearest, axis=1)) + 1e-3)
        probs = np.zeros((n, len(SHIPPING_SIZES)), dtype=np.float64)
        for row in range(n):
            probs[row] = np.bincount(self.labels[nearest[row]], weights=votes[row], minlength=len(SHIPPING_SIZES))
        probs /= probs.sum(axis=1, keepdims=True)
        return probs.astype(np.float32)

    def predict(self, *args: Any, **kwargs: Any) -> list[str]:
        return [SHIPPING_SIZES[i] for i in self.predict_proba(*args, **kwargs).argmax(1)]

    def save(self, path: Path) -> None:
        np.savez(path / REFERENCE, reference=self.reference, labels=self.labels)
        (path / PREP).write_text(json.dumps({"prep": asdict(self.prep), "config": asdict(self.config)}))

    @classmethod
    def load(cls, path: Path | str) -> ShippingEstimator:
        path = Path(path)
        card = read_card(path)
        saved = json.loads((path / PREP).read_text())
        with np.load(path / REFERENCE) as data:
            reference, labels = data["reference"], data["labels"]
        prep = ShippingPrep(tuple(saved["prep"]["mean"]), tuple(saved["prep"]["std"]))
        return cls(reference, labels, prep, ShippingConfig(**saved["config"]), card.version)
