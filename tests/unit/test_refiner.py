"""The detector's box refiner: box corrections, how proposals become training samples, old artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from meshserve.errors import InvalidInput
from meshserve.training.datasets import PhotoSet
from meshserve.training.detector import CONFIG_FILE, Detector, DetectorConfig
from meshserve.training.embedder import EmbedNet
from meshserve.training.refiner import (
    BoxRefiner,
    RefinerSchedule,
    apply_deltas,
    box_deltas,
    training_samples,
    unmirror,
)


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
    assert np.allclose(samples.targets[0], box_deltas(proposals[:1], truth)[0])
    assert np.array_equal(samples.targets[1], np.zeros(4, np.float32))


def test_refiner_starts_from_the_crop_net_category_head() -> None:
    net, head = EmbedNet(32, 8), nn.Linear(32, 16)
    refiner = BoxRefiner.from_crop_net(net, head, width=8, dim=32).eval()
    x = torch.randn(3, 3, 24, 24)
    logits, deltas = refiner(x)
    with torch.no_grad():
        expected = head(net.eval()(x))
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
