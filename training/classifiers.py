"""Listing-policy classifiers: one small torch model per violation, over hashed text + price."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from meshserve.errors import InvalidInput, NotFound
from meshserve.training import artifacts
from meshserve.training.catalogue import CATEGORY_NAMES, VIOLATIONS, Item
from meshserve.training.features import as_text, bag_offsets, finite_column, one_hot

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

    @classmethod
    def fit(cls, items: Sequence[Item]) -> Prep:
        by_cat: dict[str, list[float]] = {}
        for item in items:
            by_cat.setdefault(item.category, []).append(item.price)
        return cls(
            categories=CATEGORY_NAMES,
            category_median_price={c: float(np.median(p)) for c, p in sorted(by_cat.items())},
            global_median_price=float(np.median([i.price for i in items])),
        )


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


@dataclass
class Batch:
    ids: torch.Tensor
    offsets: torch.Tensor
    dense: torch.Tensor


def make_batch(
    titles: Sequence[str],
    descriptions: Sequence[str],
    prices: np.ndarray,
    categories: Sequence[str],
    prep: Prep,
    config: ClassifierConfig,
) -> Batch:
    texts = [listing_text(t, d) for t, d in zip(titles, descriptions, strict=True)]
    ids, offsets = bag_offsets(texts, config.buckets, config.ngrams)
    return Batch(
        torch.from_numpy(ids), torch.from_numpy(offsets), torch.from_numpy(prep.dense(prices, categories))
    )


def items_batch(items: Sequence[Item], prep: Prep, config: ClassifierConfig) -> Batch:
    return make_batch(
        [i.title for i in items],
        [i.description for i in items],
        np.array([i.price for i in items], dtype=np.float64),
        [i.category for i in items],
        prep,
        config,
    )


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula, ties counted as halves."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    i = 0
    while i < len(scores):  # average ranks over runs of equal scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def split_items(items: Sequence[Item], test_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """A held-out split by item, the same for every model trained with this seed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1]))
    order = rng.permutation(len(items))
    n_test = max(1, int(round(len(items) * test_fraction)))
    test_idx = set(order[:n_test].tolist())
    train = [it for k, it in enumerate(items) if k not in test_idx]
    test = [it for k, it in enumerate(items) if k in test_idx]
    return train, test


def _best_f1_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    best, best_t = -1.0, 0.5
    for t in np.unique(np.round(probs, 4)):
        pred = probs >= t
        tp = float((pred & labels).sum())
        f1 = 2 * tp / max(float(pred.sum() + labels.sum()), 1.0)
        if f1 > best:
            best, best_t = f1, float(t)
    return best_t


def train_one(
    violation: str,
    train: Sequence[Item],
    prep: Prep,
    config: ClassifierConfig,
    train_batch: Batch | None = None,
) -> ListingNet:
    """Full-batch Adam on the training split; class-weighted so rare violations still count."""
    torch.manual_seed(config.seed * 1009 + VIOLATIONS.index(violation))
    batch = train_batch or items_batch(train, prep, config)
    y = torch.tensor([item.label(violation) for item in train], dtype=torch.float32)
    pos = float(y.sum())
    pos_weight = torch.tensor((len(y) - pos) / max(pos, 1.0))
    net = ListingNet(config.buckets, config.hidden, prep.n_dense)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    net.train()
    for _ in range(config.epochs):
        opt.zero_grad()
        loss = loss_fn(net(batch.ids, batch.offsets, batch.dense), y)
        loss.backward()
        opt.step()
    net.eval()
    return net


def _probs(net: ListingNet, batch: Batch) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(net(batch.ids, batch.offsets, batch.dense)).numpy().astype(np.float32)


def train_classifiers(
    items: Sequence[Item],
    *,
    config: ClassifierConfig = ClassifierConfig(),
    data_seed: int = 0,
    home: Path | None = None,
    progress: Any = None,
) -> tuple[Path, dict[str, dict[str, float]]]:
    """Train one classifier per violation, write them as one versioned artifact, return metrics.

    Layout: models/classifier/<version>/<violation>/{weights.pt, prep.json, card.json} and a
    card.json at the version level summarising all of them.
    """
    watch = artifacts.Stopwatch()
    train, test = split_items(items, config.test_fraction, config.seed)
    prep = Prep.fit(train)
    train_batch, test_batch = items_batch(train, prep, config), items_batch(test, prep, config)
    version, root = artifacts.new_version(KIND, home)
    metrics: dict[str, dict[str, float]] = {}
    for violation in VIOLATIONS:
        one = artifacts.Stopwatch()
        net = train_one(violation, train, prep, config, train_batch)
        labels = np.array([it.label(violation) for it in test], dtype=bool)
        train_labels = np.array([it.label(violation) for it in train], dtype=bool)
        threshold = _best_f1_threshold(train_labels, _probs(net, train_batch))
        probs = _probs(net, test_batch)
        pred = probs >= threshold
        tp = float((pred & labels).sum())
        metrics[violation] = {
            "roc_auc": round(roc_auc(labels, probs), 4),
            "precision": round(tp / max(float(pred.sum()), 1.0), 4),
            "recall": round(tp / max(float(labels.sum()), 1.0), 4),
            "threshold": round(threshold, 4),
            "test_positives": int(labels.sum()),
            "test_items": len(test),
        }
        _save_one(root / violation, net, prep, config, version, violation, metrics[violation],
                  data_seed, one.elapsed)
        if progress is not None:
            progress.update(1)
    artifacts.write_card(
        root,
        artifacts.ModelCard(
            kind=KIND,
            version=version,
            data_seed=data_seed,
            metrics=metrics,
            signature=SIGNATURE_DOC,
            training_time_s=round(watch.elapsed, 2),
            config=asdict(config),
            extra={"models": list(VIOLATIONS), "train_items": len(train), "test_items": len(test)},
        ),
    )
    return root, metrics


SIGNATURE_DOC = {
    "inputs": {
        "title": "bytes [n] (UTF-8)",
        "description": "bytes [n] (UTF-8)",
        "price": "float32 [n] (> 0)",
        "category": "bytes [n]",
    },
    "outputs": {"score": "float32 [n], probability of the violation", "flagged": "bool [n]"},
}


def _save_one(
    path: Path,
    net: ListingNet,
    prep: Prep,
    config: ClassifierConfig,
    version: str,
    violation: str,
    metrics: dict[str, float],
    data_seed: int,
    seconds: float,
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path / WEIGHTS)
    (path / PREP).write_text(json.dumps(asdict(prep), indent=2, sort_keys=True))
    artifacts.write_card(
        path,
        artifacts.ModelCard(
            kind=KIND,
            version=version,
            name=violation,
            data_seed=data_seed,
            metrics=metrics,
            signature=SIGNATURE_DOC,
            training_time_s=round(seconds, 2),
            config=asdict(config),
        ),
    )


class ViolationClassifier:
    """One trained classifier, loaded for inference in this process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        card = artifacts.read_card(self.path)
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
        self.net = ListingNet(self.config.buckets, self.config.hidden, self.prep.n_dense)
        self.net.load_state_dict(torch.load(self.path / WEIGHTS, map_location="cpu", weights_only=True))
        self.net.eval()

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
        batch = make_batch(
            [as_text(t, "title") for t in titles],
            [as_text(d, "description") for d in descriptions],
            finite_column(prices, "price", positive=True),
            [as_text(c, "category") for c in categories],
            self.prep,
            self.config,
        )
        return _probs(self.net, batch)


def resolve_classifier_dir(model: str | None, home: Path | None = None) -> Path:
    """`--model`: a violation directory, a violation name (newest artifact), or a version dir
    holding exactly one classifier; no value means the newest artifact, which needs a name."""
    if model and model in VIOLATIONS:
        root = artifacts.resolve_model_dir(KIND, None, home)
        return root / model
    root = artifacts.resolve_model_dir(KIND, model, home)
    if (root / WEIGHTS).is_file():
        return root
    inside = sorted(p.name for p in root.iterdir() if (p / WEIGHTS).is_file())
    raise InvalidInput(
        f"{root} holds {len(inside)} classifiers ({', '.join(inside)}); "
        f"pick one: --model {inside[0] if inside else 'NAME'} or --model {root}/NAME"
    )

