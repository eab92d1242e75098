"""The detector's box refiner: box corrections, how proposals become training samples, old artifacts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from meshserve.errors import InvalidInput
from meshserve.inference.crops import crop
from meshserve.inference.detector import CONFIG_FILE, Detector, DetectorConfig
from meshserve.inference.embedder import EmbedNet, pooled_dim, to_tensor
from meshserve.inference.refiner import (
    ASPECT_SPREAD,
    REFINE_PAD,
    SURE,
    BoxRefiner,
    apply_deltas,
    box_shape,
    unmirror,
)
from meshserve.training.datasets import PhotoSet
from meshserve.training.refiner import RefinerSchedule, box_deltas, training_samples


def test_deltas_round_trip_and_stay_inside_the_image() -> None:
    proposals = np.array([[10, 10, 50, 70], [0, 0, 20, 20]], np.float32)
    truth = np.array([[14, 6, 58, 66], [2, 1, 19, 22]], np.float32)
    d = box_deltas(proposals, truth)
    assert np.allclose(d[0], [4 / 40, -4 / 60, 8 / 40, -4 / 60])
    assert np.allclose(apply_deltas(proposals, d, 100, 100), truth, atol=1e-4)
    # corrections past the image edge are clipped to it
    out = apply_deltas(proposals, np.array([[-1, -1, 1, 1]] * 2, np.float32), 60, 60)
    assert out.min() >= 0 and out[:, 2].max() <= 60 and out[:, 3].max() <= 60
    # a correction that collapses the box keeps the proposal
    collapsed = apply_deltas(proposals[:1], np.array([[0.6, 0, -0.6, 0]], np.float32), 100, 100)
    assert np.array_equal(collapsed, proposals[:1])


def test_corrections_of_a_mirrored_crop_map_back_to_the_crop() -> None:
    width = 100
    proposal = np.array([[10, 10, 50, 70]], np.float32)
    truth = np.array([[14, 6, 58, 66]], np.float32)

    def mirror(b: np.ndarray) -> np.ndarray:
        return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)

    seen_mirrored = torch.from_numpy(box_deltas(mirror(proposal), mirror(truth)))
    assert np.allclose(unmirror(seen_mirrored).numpy(), box_deltas(proposal, truth))


def test_proposals_are_labelled_by_overlap_and_background_is_capped() -> None:
    image = np.full((100, 100, 3), 128, np.uint8)
    truth = np.array([[20, 20, 60, 60]], np.float32)
    photos = PhotoSet(image[None], [truth], [np.array([5])], [np.array([42])])
    proposals = np.array([
        [22, 18, 62, 58],  # IoU ≈ 0.82: category 5, with a box target
        [20, 40, 60, 80],  # IoU 1/3: neither product nor background, left out
        [70, 70, 95, 95],  # off the product: background
        [0, 70, 25, 95],  # background too, but only one is kept per photo
    ], np.float32)
    schedule = RefinerSchedule(background_per_photo=1, truth_jitter=0.1)
    samples = training_samples(photos, [proposals], 16, 24, schedule)
    # matched proposal, one background, the jittered true box
    assert samples.labels.tolist() == [5, 16, 5]
    assert samples.has_box.tolist() == [True, False, True]
    assert samples.crops.shape == (3, 24, 24, 3) and samples.crops.dtype == np.uint8
    assert samples.shapes.shape == (3, 2)
    assert np.allclose(samples.shapes[:2], box_shape(proposals[[0, 2]]))
    assert np.allclose(samples.targets[0], box_deltas(proposals[:1], truth)[0])
    assert np.array_equal(samples.targets[1], np.zeros(4, np.float32))


def test_refiner_starts_from_the_crop_net_category_head() -> None:
    net, head = EmbedNet(32, 8), nn.Linear(pooled_dim(8), 16)
    refiner = BoxRefiner.from_crop_net(net, head, width=8, dim=32).eval()
    x = torch.randn(3, 3, 24, 24)
    logits, deltas = refiner(x, torch.from_numpy(box_shape(np.array([[0, 0, 10, 20], [0, 0, 20, 10],
                                                                      [0, 0, 5, 5]]))))
    with torch.no_grad():
        expected = head(net.eval().pool(x))
    assert torch.allclose(logits[:, :16], expected, atol=1e-5)
    assert torch.all(logits[:, 16] == 0) and torch.all(deltas == 0)  # trusts the proposal


def test_a_detector_from_before_the_refiner_is_refused_with_the_fix(tmp_path: Path) -> None:
    saved = json.loads(json.dumps(DetectorConfig.tiny().__dict__))
    for key in ("refine_epochs", "refine_photos", "refine_lr"):
        saved.pop(key)
    saved.update(cat_finetune_epochs=3, cat_finetune_lr=2e-3)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(InvalidInput, match="meshserve train"):
        Detector.load(tmp_path)


def _refiner(seed: int = 0) -> BoxRefiner:
    torch.manual_seed(seed)
    refiner = BoxRefiner(16, 8, 32).eval()
    with torch.no_grad():  # a box correction that is not zero, so the views could disagree on it
        refiner.deltas[3].bias.copy_(torch.tensor([0.05, -0.02, 0.03, 0.01]))
        refiner.shape_prior.weight.normal_()  # and every view must be given its box's shape
    return refiner


def test_the_box_shape_that_the_square_crop_hides_reaches_the_category() -> None:
    a = np.log(2) / ASPECT_SPREAD
    assert np.allclose(box_shape(np.array([[0, 0, 20, 10], [5, 5, 10, 10]])), [[a, a * a], [0, 0]])
    refiner = BoxRefiner(16, 8, 32).eval()
    with torch.no_grad():  # the crops say nothing; wide boxes are category 3, tall ones 4
        refiner.classify.weight.zero_()
        refiner.classify.bias.zero_()
        refiner.shape_prior.weight[3, 0] = 5.0
        refiner.shape_prior.weight[4, 0] = -5.0
    image = np.full((100, 100, 3), 128, np.uint8)
    wide_and_tall = [np.array([[10, 40, 90, 60], [40, 10, 60, 90]], np.float32)]
    probs, _ = refiner.refine([image], wide_and_tall, 24, view_shift=0.08)
    assert probs[0].argmax(1).tolist() == [3, 4]


def test_moved_views_average_the_category_of_a_doubtful_proposal_and_keep_its_box() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    proposals = [np.array([[20, 30, 80, 100], [100, 10, 150, 60]], np.float32)]
    refiner = _refiner()  # untrained: every answer is in doubt
    one_probs, one_boxes = refiner.refine([image], proposals, 24)
    five_probs, five_boxes = refiner.refine([image], proposals, 24, view_shift=0.08)
    assert one_probs[0].max() < SURE
    assert five_probs[0].shape == one_probs[0].shape == (2, 17)
    assert np.allclose(five_probs[0].sum(1), 1, atol=1e-5)
    assert not np.allclose(five_probs[0], one_probs[0])  # the moved crops were looked at
    assert np.allclose(five_boxes[0], one_boxes[0], atol=1e-5)

    # the same average computed view by view
    def moved(dx: float, dy: float) -> np.ndarray:
        b = proposals[0]
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        return b + np.stack([dx * w, dy * h, dx * w, dy * h], 1)

    views = [refiner.refine([image], [moved(dx, dy)], 24)[0][0]
             for dx, dy in ((0, 0), (0.08, 0), (-0.08, 0), (0, 0.08), (0, -0.08))]
    assert np.allclose(np.mean(views, 0), five_probs[0], atol=1e-5)

    # only the proposals marked for a closer look are seen mirrored and moved
    marked, marked_boxes = refiner.refine([image], proposals, 24, view_shift=0.08,
                                          look_closer=[np.array([False, True])])
    with torch.no_grad():
        logits, deltas = refiner(to_tensor(np.stack([crop(image, proposals[0][0], 24, REFINE_PAD)])),
                                 torch.from_numpy(box_shape(proposals[0][:1])))
    assert np.allclose(marked[0][0], torch.softmax(logits, 1)[0].numpy(), atol=1e-6)
    assert np.allclose(marked_boxes[0][0], apply_deltas(proposals[0][:1], deltas.numpy(), 160, 120),
                       atol=1e-4)
    assert np.allclose(marked[0][1], five_probs[0][1], atol=1e-6)
    assert np.allclose(marked_boxes[0][1], five_boxes[0][1], atol=1e-5)

    # a refiner sure of its answer is not asked again
    with torch.no_grad():
        refiner.classify.bias[3] = 30.0
    sure_once, _ = refiner.refine([image], proposals, 24)
    sure_moved, _ = refiner.refine([image], proposals, 24, view_shift=0.08)
    assert sure_once[0].max(1).min() > SURE
    assert np.array_equal(sure_once[0], sure_moved[0])


def test_a_sliver_at_the_image_edge_survives_the_moved_views() -> None:
    image = np.full((50, 50, 3), 90, np.uint8)
    sliver = [np.array([[49, 0, 50, 50], [0, 49, 50, 50]], np.float32)]
    probs, boxes = _refiner().refine([image], sliver, 24, view_shift=0.4)
    assert probs[0].shape == (2, 17) and np.isfinite(probs[0]).all()
    assert boxes[0].min() >= 0 and boxes[0][:, 2:].max() <= 50


def test_a_box_in_doubt_is_reported_under_each_likely_category() -> None:
    det = Detector.untrained(replace(DetectorConfig.tiny(), labels_per_box=3, label_ratio=0.1))
    probs = np.zeros((3, 16), np.float32)
    probs[0, [4, 7, 9, 2]] = [0.55, 0.3, 0.1, 0.05]  # 7 and 9 are likely enough, 2 is not
    probs[1, 3] = 0.97  # sure of itself: one label
    probs[2, 5] = 0.9  # but too faint to report at all
    objectness = np.array([0.81, 0.64, 0.0004], np.float32)
    box_of, labels, scores = det._labelled(probs, objectness, threshold=0.05)
    assert box_of.tolist() == [0, 0, 0, 1]
    assert labels.tolist() == [4, 7, 9, 3]
    assert np.allclose(scores, [0.9 * 0.55, 0.9 * 0.3, 0.9 * 0.1, 0.8 * 0.97])


def test_detnet_category_is_mixed_into_the_refiners_and_background_stays() -> None:
    det = Detector.untrained(DetectorConfig.tiny())
    w = det.cfg.detnet_category_weight
    assert 0 < w < 1
    refiner = np.zeros((2, 17), np.float32)
    refiner[0, [3, 5, 16]] = [0.6, 0.2, 0.2]  # 0.8 product, 0.2 background
    refiner[1, 16] = 1.0  # background: DetNet cannot make a product of it
    detnet = np.zeros((2, 16), np.float32)
    detnet[:, 5] = 1.0
    mixed = det._category_probs(refiner, detnet)
    assert mixed.shape == (2, 16)
    assert np.allclose(mixed[0, 3], (1 - w) * 0.75 * 0.8)
    assert np.allclose(mixed[0, 5], ((1 - w) * 0.25 + w) * 0.8)
    assert np.isclose(mixed[0].sum(), 0.8) and np.allclose(mixed[1], 0, atol=1e-5)
