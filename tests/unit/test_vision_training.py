"""Tiny detector and embedder training runs: they learn, write a card, and reload identically."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from meshserve.inference.detector import Detector, DetectorConfig
from meshserve.inference.embedder import Embedder, EmbedderConfig
from meshserve.servers.detector import DetectorModel
from meshserve.servers.embedder import EmbedderModel
from meshserve.training.catalogue import generate_items
from meshserve.training.detector import train_detector
from meshserve.training.embedder import train_embedder
from meshserve.training.render import render_photo
from meshserve.wire.signatures import card_signature

ITEMS = generate_items(32)


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MESHSERVE_RENDER_WORKERS", "1")


def test_tiny_detector_learns_and_reloads_bit_for_bit(tmp_path: Path) -> None:
    out = tmp_path / "det"
    metrics = train_detector(DetectorConfig.tiny(), out, progress=False, items=ITEMS, data_seed=9)
    assert metrics["loss_last"] < 0.75 * metrics["loss_first"]
    assert metrics["ap50_class_agnostic"] > 0.05  # an untrained head finds nothing at IoU 0.5
    assert metrics["refine_samples"] > 0 and metrics["refine_loss"][1] < metrics["refine_loss"][0]
    card = json.loads((out / "card.json").read_text())
    assert card["kind"] == "detector" and card["data_seed"] == 9
    assert card["metrics"]["ap50"] == metrics["ap50"]
    boxes_out = next(spec for spec in card["signature"]["outputs"] if spec["name"] == "boxes")
    cfg = DetectorConfig.tiny()
    assert boxes_out["shape"] == [-1, cfg.max_detections * cfg.labels_per_box, 4]
    # the card documents exactly the signature the detector server serves
    assert card["signature"] == card_signature(DetectorModel(str(out)).signature)

    det = Detector.load(out)
    photos = [render_photo(it, 77).image for it in ITEMS[:3]]
    b1, l1, s1 = det.detect(photos, score_threshold=0.0)
    b2, l2, s2 = Detector.load(out).detect(photos, score_threshold=0.0)
    for a, b in zip(b1 + l1 + s1, b2 + l2 + s2, strict=True):
        assert np.array_equal(a, b)
    for boxes, image in zip(b1, photos, strict=True):
        h, w = image.shape[:2]
        assert boxes.dtype == np.float32 and boxes.shape[1] == 4
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    # tiny and odd images give sane, empty-or-small answers, never a crash
    b, lab, sc = det.detect([np.zeros((1, 1, 3), np.uint8), np.full((3, 500, 3), 200, np.uint8)],
                            score_threshold=0.0)
    assert len(b) == 2 and all(x.shape[1] == 4 for x in b)
    assert all(((x[:, 2] - x[:, 0]) >= 1).all() for x in b)
    # a non-square photo: boxes come back in its own pixels
    wide = np.zeros((40, 100, 3), dtype=np.uint8)
    boxes, _, _ = det.detect([wide], score_threshold=0.0)
    assert (boxes[0][:, 2] <= 100).all() and (boxes[0][:, 3] <= 40).all()


def test_tiny_embedder_learns_same_item_retrieval(tmp_path: Path) -> None:
    out = tmp_path / "emb"
    cfg = replace(EmbedderConfig.tiny(), epochs=40)
    metrics = train_embedder(cfg, out, progress=False, items=ITEMS, data_seed=9)
    assert metrics["loss_last"] < 0.7 * metrics["loss_first"]
    chance = 10 / len(ITEMS)
    assert metrics["recall@10"] > chance + 0.15, metrics
    card = json.loads((out / "card.json").read_text())
    assert card["kind"] == "embedder" and card["signature"]["outputs"][0]["shape"] == [-1, -1, cfg.dim]
    assert card["signature"] == card_signature(EmbedderModel(str(out)).signature)
    assert "histogram_recall@10" in card["metrics"]

    emb = Embedder.load(out)
    photos = [render_photo(it, 5) for it in ITEMS[:4]]
    vecs = emb.embed([p.image for p in photos], [p.boxes for p in photos])
    assert vecs.shape == (4, cfg.dim) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    again = Embedder.load(out).embed([p.image for p in photos], [p.boxes for p in photos])
    assert np.array_equal(vecs, again)
    assert emb.embed([photos[0].image], [np.zeros((0, 4))]).shape == (0, cfg.dim)
    one = emb.embed([np.zeros((1, 1, 3), np.uint8)], [np.array([[0, 0, 1, 1]], np.float32)])
    assert one.shape == (1, cfg.dim) and np.isfinite(one).all()


def test_detnet_starts_from_the_crop_network() -> None:
    from meshserve.inference.detector import DetNet
    from meshserve.inference.embedder import EmbedNet

    crop_net = EmbedNet(32, 8)
    det = DetNet.from_crop_net(crop_net, 8, n_classes=16)
    trained = crop_net.features.state_dict()
    copied = {**{f"{i}.{k}": v for i, layer in enumerate(det.s8) for k, v in layer.state_dict().items()},
              **{f"{i + len(det.s8)}.{k}": v for i, layer in enumerate(det.s16)
                 for k, v in layer.state_dict().items()}}
    assert copied.keys() == trained.keys()
    assert all(torch.equal(copied[k], trained[k]) for k in trained)
    obj, box, category = det(torch.zeros(2, 3, 64, 64))
    assert obj.shape == (2, 1, 8, 8) and box.shape == (2, 4, 8, 8)  # stride 8
    assert category.shape == (2, 16, 8, 8)


def test_a_detector_of_an_older_layout_is_refused_with_the_reason(tmp_path: Path) -> None:
    from meshserve.errors import InvalidInput
    from meshserve.inference.detector import CONFIG_FILE, outdated

    out = tmp_path / "det"
    Detector.untrained(DetectorConfig.tiny()).save(out)
    assert outdated(out) is None
    Detector.load(out)
    saved = json.loads((out / CONFIG_FILE).read_text())

    saved["weights_layout"] = 2  # written before the refiner's category head read the pooled features
    (out / CONFIG_FILE).write_text(json.dumps(saved))
    assert outdated(out) == "its box refiner has the older heads"

    del saved["weights_layout"]  # written before DetNet ran on the crop network's stages
    (out / CONFIG_FILE).write_text(json.dumps(saved))
    assert outdated(out) == "its DetNet predates the crop-network backbone"
    with pytest.raises(InvalidInput, match="older meshserve .its DetNet predates"):
        Detector.load(out)

    del saved["refine_epochs"]
    (out / CONFIG_FILE).write_text(json.dumps(saved))
    assert outdated(out) == "it predates the box refiner"


def test_detnet_with_its_mirror_view_proposes_mirrored_boxes_for_a_mirrored_photo() -> None:
    torch.manual_seed(3)
    det = Detector.untrained(DetectorConfig.tiny())  # random weights: DetNet alone is not symmetric
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mirrored = np.ascontiguousarray(image[:, ::-1])

    def proposals(d: Detector, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes, objectness, _ = d.propose([img], threshold=0.0)
        order = np.argsort(-objectness[0].numpy(), kind="stable")
        return boxes[0].numpy()[order], objectness[0].numpy()[order]

    boxes, scores = proposals(det, image)
    m_boxes, m_scores = proposals(det, mirrored)
    assert len(boxes) > 0
    assert np.allclose(scores, m_scores, atol=1e-5)
    assert np.allclose(np.stack([64 - m_boxes[:, 2], m_boxes[:, 1], 64 - m_boxes[:, 0], m_boxes[:, 3]], 1),
                       boxes, atol=1e-3)

    one_view = Detector(det.net, det.refiner, replace(det.cfg, mirrored_detnet=False))
    plain, plain_mirrored = proposals(one_view, image)[1], proposals(one_view, mirrored)[1]
    assert plain.shape != plain_mirrored.shape or not np.allclose(plain, plain_mirrored, atol=1e-5)


def test_the_crop_network_cache_is_keyed_by_training_not_by_evaluation() -> None:
    from meshserve.training.embedder import train_crop_net

    cfg = replace(EmbedderConfig.tiny(), epochs=1)
    net, _, first = train_crop_net(cfg, ITEMS[:8], progress=False)
    assert not first.get("reused_cached_training")
    again, _, metrics = train_crop_net(replace(cfg, eval_photos=5), ITEMS[:8], progress=False)
    assert metrics["reused_cached_training"]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(),
                                                  strict=True))
    _, _, other = train_crop_net(replace(cfg, category_weight=2.0), ITEMS[:8], progress=False)
    assert not other.get("reused_cached_training")


def test_the_embedder_card_counts_its_evaluation_photos(tmp_path: Path) -> None:
    cfg = replace(EmbedderConfig.tiny(), epochs=1, eval_photos=6)
    metrics = train_embedder(cfg, tmp_path / "emb", progress=False, items=ITEMS, data_seed=9)
    assert 6 <= metrics["queries"] <= 12  # one or two products per photo
    assert metrics["references"] == len(ITEMS)
