"""Listing-policy classifiers at inference: one small model per violation over hashed text and price, trained
as a torch net (training/classifiers.py) and served from its weights in numpy."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from meshserve.errors import InvalidInput, NotFound
from meshserve.inference.artifacts import read_card, resolve_model_dir
from meshserve.inference.features import as_text, bag_offsets, finite_column, one_hot
from meshserve.inference.vocabulary import VIOLATIONS

KIND = "classifier"
WEIGHTS = "weights.pt"
PREP = "prep.json"


@dataclass(frozen=True)
class ClassifierConfig:
    buckets: int = 1 << 15
    ngrams: int = 1
    hidden: int = 0  # 0: logistic regression; > 0: one ReLU layer of this width
    epochs: int = 150
    lr: float = 0.05
    # Strong L2 matters more than anything else here: ids, sizes and brands are nearly
    # unique per listing, and an unregularised bag memorises them (held-out AUC ~0.85).
    weight_decay: float = 1e-2
    test_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.05 <= self.test_fraction <= 0.5:
            raise ValueError("test_fraction must be within [0.05, 0.5]")
        if self.buckets < 16 or self.hidden < 0 or self.epochs < 1:
            raise ValueError("buckets ≥ 16, hidden ≥ 0 and epochs ≥ 1 are required")


@dataclass(frozen=True)
class Prep:
    """What turns a listing into dense features, fitted on the training split only."""

    categories: tuple[str, ...]
    category_median_price: dict[str, float]
    global_median_price: float

    def dense(self, prices: np.ndarray, categories: Sequence[str]) -> np.ndarray:
        log_price = np.log(prices)
        medians = np.array(
            [self.category_median_price.get(c, self.global_median_price) for c in categories]
        )
        relative = log_price - np.log(medians)  # cheap for its kind is a counterfeit tell
        numeric = np.stack([relative, (log_price - 3.5) / 2.0], axis=1).astype(np.float32)
        return np.concatenate([numeric, one_hot(categories, self.categories, "category")], axis=1)

    @property
    def n_dense(self) -> int:
        return 2 + len(self.categories)


class ListingNet(nn.Module):
    """Bag of hashed n-grams (summed weights) + dense features → logit, optionally via a
    hidden ReLU layer."""

    def __init__(self, buckets: int, hidden: int, n_dense: int):
        super().__init__()
        width = max(hidden, 1)
        self.bag = nn.EmbeddingBag(buckets, width, mode="sum")
        nn.init.normal_(self.bag.weight, std=0.01)
        self.dense = nn.Linear(n_dense, width)
        self.out = nn.Linear(hidden, 1) if hidden > 0 else None

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        z = self.bag(ids, offsets) + self.dense(dense)
        if self.out is not None:
            z = self.out(torch.relu(z))
        return z.squeeze(-1)


def listing_text(title: str, description: str) -> str:
    return f"{title} . {description}"


@dataclass(frozen=True)
class ListingWeights:
    """A trained ListingNet's forward pass in numpy, for serving. The net is a sum of looked-up rows
    and a matmul or two; numpy does that with a fraction of the code torch's dispatcher runs, which
    is what a listing model's call costs when it was idle a few ms (bench/idle_gap.py)."""

    bag: np.ndarray  # [buckets, width]
    dense_weight: np.ndarray  # [width, n_dense]
    dense_bias: np.ndarray  # [width]
    out_weight: np.ndarray | None  # [1, hidden], or None: logistic regression
    out_bias: np.ndarray | None  # [1]

    @classmethod
    def of(cls, net: ListingNet) -> ListingWeights:
        def array(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)

        out = net.out
        return cls(array(net.bag.weight), array(net.dense.weight), array(net.dense.bias),
                   None if out is None else array(out.weight), None if out is None else array(out.bias))  # fmt: skip

    def probabilities(self, ids: np.ndarray, offsets: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """The net's probability of the violation per listing, float32 [n], for bag_offsets() ids and
        offsets (every row holds ≥ 1 id) and Prep.dense() features."""
        z = np.add.reduceat(self.bag[ids], offsets, axis=0) + dense @ self.dense_weight.T + self.dense_bias
        if self.out_weight is not None:
            z = np.maximum(z, 0) @ self.out_weight.T + self.out_bias
        logits = z[:, 0].astype(np.float64)
        return (0.5 + 0.5 * np.tanh(0.5 * logits)).astype(np.float32)  # the sigmoid, without exp's overflow


class ViolationClassifier:
    """One trained classifier, loaded for inference in this process (its forward pass in numpy)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        card = read_card(self.path)
        if not (self.path / WEIGHTS).is_file():
            raise NotFound(
                f"{self.path} holds no {WEIGHTS}; pass one violation's directory "
                f"(one of: {', '.join(VIOLATIONS)}) inside a classifier artifact"
            )
        self.card = card
        self.name = card.name
        self.version = card.version
        self.config = ClassifierConfig(**card.config)
        prep = json.loads((self.path / PREP).read_text())
        self.prep = Prep(
            categories=tuple(prep["categories"]),
            category_median_price=dict(prep["category_median_price"]),
            global_median_price=float(prep["global_median_price"]),
        )
        self.threshold = float(card.metrics.get("threshold", 0.5))
        net = ListingNet(self.config.buckets, self.config.hidden, self.prep.n_dense)
        net.load_state_dict(torch.load(self.path / WEIGHTS, map_location="cpu", weights_only=True))
        self.weights = ListingWeights.of(net.eval())

    def score(
        self,
        titles: Sequence[bytes | str],
        descriptions: Sequence[bytes | str],
        prices: np.ndarray | Sequence[float],
        categories: Sequence[bytes | str],
    ) -> np.ndarray:
        """Probability of the violation per listing, float32 [n]."""
        n = len(titles)
        if not (len(descriptions) == len(categories) == n and len(np.asarray(prices).reshape(-1)) == n):
            raise InvalidInput("title, description, price and category need the same length")
        texts = [listing_text(as_text(t, "title"), as_text(d, "description"))
                 for t, d in zip(titles, descriptions, strict=True)]  # fmt: skip
        ids, offsets = bag_offsets(texts, self.config.buckets, self.config.ngrams)
        dense = self.prep.dense(finite_column(prices, "price", positive=True),
                                [as_text(c, "category") for c in categories])  # fmt: skip
        return self.weights.probabilities(ids, offsets, dense)


def resolve_classifier_dir(model: str | None, home: Path | None = None) -> Path:
    """`--model`: a violation directory, a violation name (newest artifact), or a version dir
    holding exactly one classifier; no value means the newest artifact, which needs a name."""
    if model and model in VIOLATIONS:
        root = resolve_model_dir(KIND, None, home)
        return root / model
    root = resolve_model_dir(KIND, model, home)
    if (root / WEIGHTS).is_file():
        return root
    inside = sorted(p.name for p in root.iterdir() if (p / WEIGHTS).is_file())
    raise InvalidInput(
        f"{root} holds {len(inside)} classifiers ({', '.join(inside)}); "
        f"pick one: --model {inside[0] if inside else 'NAME'} or --model {root}/NAME"
    )
