"""Artifacts (versions, cards, latest), the listing classifiers and the shipping-size estimator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from meshserve.errors import InvalidInput, NotFound
from meshserve.inference import artifacts
from meshserve.inference.classifiers import ClassifierConfig, ListingNet, ListingWeights, Prep, ViolationClassifier
from meshserve.inference.features import ngram_ids
from meshserve.inference.shipping import ShippingConfig, ShippingEstimator
from meshserve.inference.vocabulary import SHIPPING_SIZES, VIOLATIONS
from meshserve.servers.classifier import ClassifierModel
from meshserve.servers.shipping import ShippingModel
from meshserve.training.catalogue import generate_items
from meshserve.training.classifiers import make_batch, probabilities, roc_auc, split_items, train_classifiers
from meshserve.training.shipping import fit_estimator, train_shipping
from meshserve.wire.signatures import card_signature


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # the tests after these train with the machine's default


# ------------------------------------------------------------------------------ artifacts


def test_home_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESHSERVE_HOME", str(tmp_path / "h"))
    assert artifacts.meshserve_home() == tmp_path / "h"
    monkeypatch.delenv("MESHSERVE_HOME")
    assert artifacts.meshserve_home() == Path.home() / ".cache" / "meshserve"


def test_versions_are_unique_sortable_and_latest_needs_a_card(tmp_path: Path) -> None:
    made = [artifacts.new_version("shipping", tmp_path) for _ in range(3)]
    names = [v for v, _ in made]
    assert len(set(names)) == 3 and names == sorted(names)
    assert artifacts.latest("shipping", tmp_path) is None  # no cards yet: nothing complete
    for version, path in made[:2]:
        card = artifacts.ModelCard("shipping", version, data_seed=3, metrics={"a": np.float32(0.5)})
        artifacts.write_card(path, card)
    assert artifacts.latest("shipping", tmp_path) == made[1][1]  # the third is unfinished
    card = artifacts.read_card(made[1][1])
    assert card.version == names[1] and card.data_seed == 3 and card.metrics == {"a": 0.5}
    assert card.created_at.endswith("Z")
    assert artifacts.resolve_model_dir("shipping", names[0], tmp_path) == made[0][1]
    assert artifacts.resolve_model_dir("shipping", None, tmp_path) == made[1][1]


def test_resolve_explains_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="meshserve train"):
        artifacts.resolve_model_dir("detector", None, tmp_path)
    with pytest.raises(NotFound, match="does not exist"):
        artifacts.resolve_model_dir("detector", str(tmp_path / "nope"), tmp_path)
    (tmp_path / "half").mkdir()
    with pytest.raises(NotFound, match="card.json"):
        artifacts.resolve_model_dir("detector", str(tmp_path / "half"), tmp_path)
    (tmp_path / "half" / "card.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        artifacts.read_card(tmp_path / "half")
    (tmp_path / "half" / "card.json").write_text(json.dumps({"kind": "detector"}))
    with pytest.raises(InvalidInput, match="lacks"):
        artifacts.read_card(tmp_path / "half")


# ------------------------------------------------------------------------------ features


def test_hashed_ngrams_are_stable_across_processes() -> None:
    """crc32, not Python's salted hash: training and serving processes must agree."""
    text = "Replica watch, AAA quality! WhatsApp me at 0712"
    here = ngram_ids(text, 4096, 2)
    there = subprocess.run(
        [sys.executable, "-c", "from meshserve.inference.features import ngram_ids;"
         f"print(ngram_ids({text!r}, 4096, 2))"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert str(here) == there
    assert len(here) > 8


# ------------------------------------------------------------------------------ classifiers


def test_roc_auc_known_values() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert roc_auc(y, np.array([0.1, 0.8, 0.4, 0.9])) == 0.75
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_split_is_disjoint_and_deterministic() -> None:
    items = generate_items(100, seed=5)
    train, test = split_items(items, 0.3, seed=1)
    again = split_items(items, 0.3, seed=1)
    assert [i.item_id for i in test] == [i.item_id for i in again[1]]
    assert len(test) == 30 and not {i.item_id for i in train} & {i.item_id for i in test}


def test_classifiers_learn_and_are_reproducible(tmp_path: Path) -> None:
    items = generate_items(500, seed=11)
    config = ClassifierConfig(epochs=60, buckets=1 << 13)
    root, metrics = train_classifiers(items, config=config, data_seed=11, home=tmp_path)
    _, again = train_classifiers(items, config=config, data_seed=11, home=tmp_path)
    assert metrics == again  # same data seed and config: same held-out figures
    for name in VIOLATIONS:
        assert metrics[name]["roc_auc"] > 0.85, (name, metrics[name])  # small data; full run ≥ 0.95
        # the card documents exactly the signature its server serves, default threshold included
        served = card_signature(ClassifierModel(str(root / name)).signature)
        assert artifacts.read_card(root / name).signature == served
    top = artifacts.read_card(root)
    assert top.kind == "classifier" and top.extra["models"] == list(VIOLATIONS)
    assert top.signature == {name: artifacts.read_card(root / name).signature for name in VIOLATIONS}
    assert artifacts.latest("classifier", tmp_path) != root  # the second run is newer


def test_violation_classifier_scores_text_and_refuses_bad_values(tmp_path: Path) -> None:
    items = generate_items(300, seed=2)
    root, _ = train_classifiers(items, config=ClassifierConfig(epochs=40), home=tmp_path)
    model = ViolationClassifier(root / "contact_info")
    assert model.name == "contact_info"
    clean = "Classic mug in white with navy trim. Condition: like new."
    spammy = clean + " WhatsApp me at 0712 345. Pay outside the app. Call me on 0712 345."
    scores = model.score(["Norda mug", "Norda mug"], [clean, spammy], [12.0, 12.0], ["mug", "mug"])
    assert scores.dtype == np.float32 and scores[1] > scores[0]
    with pytest.raises(InvalidInput, match="price"):
        model.score(["a"], ["b"], [float("nan")], ["mug"])
    with pytest.raises(InvalidInput, match="price"):
        model.score(["a"], ["b"], [0.0], ["mug"])
    with pytest.raises(InvalidInput, match="same length"):
        model.score(["a", "b"], ["b"], [1.0], ["mug"])
    with pytest.raises(InvalidInput, match="UTF-8"):
        model.score([b"\xff"], [b"b"], [1.0], [b"mug"])
    with pytest.raises(NotFound, match="violation"):
        ViolationClassifier(root)  # the version dir holds several, not one


@pytest.mark.parametrize("hidden", [0, 8])
def test_serving_forward_pass_matches_the_torch_net(hidden: int) -> None:
    """Serving scores with ListingWeights (numpy); training and evaluation with the torch net. Both
    must give the same probabilities, also for logits far out where a naive sigmoid overflows."""
    torch.manual_seed(hidden)
    prep = Prep(categories=("mug", "watch", "toy"), category_median_price={"mug": 10.0, "watch": 80.0},
                global_median_price=20.0)  # fmt: skip
    config = ClassifierConfig(buckets=512, hidden=hidden)
    net = ListingNet(config.buckets, hidden, prep.n_dense).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.5)
        net.bag.weight[7] = 400.0  # one bucket that drives its listings' logits far from zero
    titles = ["blue mug", "replica watch cheap", "", "mug mug mug", "a toy"]
    descriptions = ["ceramic, 350 ml", "call me", "x", "", "word " * 300]
    prices = np.array([12.0, 30.0, 1.0, 0.5, 9999.0])
    categories = ["mug", "watch", "toy", "mug", "unknown"]
    batch = make_batch(titles, descriptions, prices, categories, prep, config)
    batch.ids[batch.offsets[3]] = 7  # listing 3 holds the extreme bucket
    expected = probabilities(net, batch)
    got = ListingWeights.of(net).probabilities(batch.ids.numpy(), batch.offsets.numpy(), batch.dense.numpy())
    assert got.dtype == np.float32 and got.shape == expected.shape == (5,)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert float(got[3]) in (0.0, 1.0)  # the extreme listing saturates, as torch's sigmoid does


# ------------------------------------------------------------------------------ shipping


def test_shipping_beats_majority_and_round_trips(tmp_path: Path) -> None:
    items = generate_items(400, seed=3)
    root, metrics = train_shipping(items, home=tmp_path)
    assert metrics["accuracy"] > metrics["majority_baseline_accuracy"] + 0.3, metrics
    assert artifacts.read_card(root).signature == card_signature(ShippingModel(str(root)).signature)
    loaded = ShippingEstimator.load(root)
    item = items[0]
    probs = loaded.predict_proba(np.array([[item.width_cm, item.height_cm, item.depth_cm]]),
                                 [item.weight_kg], [item.category], [item.title])
    assert probs.shape == (1, len(SHIPPING_SIZES)) and abs(float(probs.sum()) - 1) < 1e-5


def test_shipping_knn_neighbours_vote() -> None:
    items = generate_items(200, seed=4)
    model = fit_estimator(items, ShippingConfig(k=1))
    dims = np.array([[i.width_cm, i.height_cm, i.depth_cm] for i in items[:20]])
    got = model.predict(dims, [i.weight_kg for i in items[:20]], [i.category for i in items[:20]],
                        [i.title for i in items[:20]])
    assert got == [i.shipping_size for i in items[:20]]  # k=1 on its own reference set


def test_shipping_refuses_bad_values() -> None:
    model = fit_estimator(generate_items(50, seed=4), ShippingConfig())
    with pytest.raises(InvalidInput, match="dims"):
        model.predict_proba(np.array([[1.0, -2.0, 3.0]]), [1.0], ["mug"])
    with pytest.raises(InvalidInput, match="weight_kg"):
        model.predict_proba(np.array([[1.0, 2.0, 3.0]]), [float("inf")], ["mug"])
    with pytest.raises(InvalidInput, match=r"shape \[n, 3\]"):
        model.predict_proba(np.array([1.0, 2.0, 3.0]), [1.0], ["mug"])
    with pytest.raises(InvalidInput, match="batch size"):
        model.predict_proba(np.ones((2, 3)), [1.0, 1.0], ["mug"])
