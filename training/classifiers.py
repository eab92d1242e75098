"""Training the listing-policy classifiers: one small torch model per violation, fitted and evaluated."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from meshserve.inference import artifacts
from meshserve.inference.classifiers import KIND, PREP, WEIGHTS, ClassifierConfig, ListingNet, Prep, listing_text
from meshserve.inference.features import bag_offsets
from meshserve.inference.vocabulary import CATEGORY_NAMES, VIOLATIONS
from meshserve.training.catalogue import Item
from meshserve.wire.signatures import card_signature, classifier_signature

DEFAULT_CONFIG = ClassifierConfig()


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


def probabilities(net: ListingNet, batch: Batch) -> np.ndarray:
    """The probability of the violation per listing, float32 [n]."""
    with torch.no_grad():
        return torch.sigmoid(net(batch.ids, batch.offsets, batch.dense)).numpy().astype(np.float32)


def fit_prep(items: Sequence[Item]) -> Prep:
    """The dense-feature preparation fitted on `items` (the training split)."""
    by_cat: dict[str, list[float]] = {}
    for item in items:
        by_cat.setdefault(item.category, []).append(item.price)
    return Prep(
        categories=CATEGORY_NAMES,
        category_median_price={c: float(np.median(p)) for c, p in sorted(by_cat.items())},
        global_median_price=float(np.median([i.price for i in items])),
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


def train_classifiers(
    items: Sequence[Item],
    *,
    config: ClassifierConfig = DEFAULT_CONFIG,
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
    prep = fit_prep(train)
    train_batch, test_batch = items_batch(train, prep, config), items_batch(test, prep, config)
    version, root = artifacts.new_version(KIND, home)
    metrics: dict[str, dict[str, float]] = {}
    for violation in VIOLATIONS:
        one = artifacts.Stopwatch()
        net = train_one(violation, train, prep, config, train_batch)
        labels = np.array([it.label(violation) for it in test], dtype=bool)
        train_labels = np.array([it.label(violation) for it in train], dtype=bool)
        threshold = _best_f1_threshold(train_labels, probabilities(net, train_batch))
        probs = probabilities(net, test_batch)
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
            signature={name: card_signature(classifier_signature(m["threshold"])) for name, m in metrics.items()},
            training_time_s=round(watch.elapsed, 2),
            config=asdict(config),
            extra={"models": list(VIOLATIONS), "train_items": len(train), "test_items": len(test)},
        ),
    )
    return root, metrics


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
            signature=card_signature(classifier_signature(metrics["threshold"])),
            training_time_s=round(seconds, 2),
            config=asdict(config),
        ),
    )
