"""Evaluation code on cases whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve.training.datasets import PhotoSet
from meshserve.training.evaluate import (
    average_precision,
    box_iou,
    color_histograms,
    evaluate_detector,
    recall_at_k,
)


def _b(*rows: tuple[float, float, float, float]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def test_box_iou_known_values() -> None:
    iou = box_iou(_b((0, 0, 10, 10)), _b((0, 0, 10, 10), (5, 0, 15, 10), (20, 20, 30, 30)))
    assert iou[0] == pytest.approx([1.0, 1 / 3, 0.0])


def test_perfect_detections_score_one() -> None:
    truth = [_b((0, 0, 10, 10)), _b((5, 5, 20, 20), (30, 30, 40, 40))]
    labels = [np.array([0]), np.array([1, 0])]
    scores = [np.array([0.9]), np.array([0.8, 0.7])]
    ap = average_precision(truth, labels, scores, truth, labels)
    assert ap["map"] == pytest.approx(1.0)


def test_missed_object_halves_recall() -> None:
    truth = [_b((0, 0, 10, 10)), _b((0, 0, 10, 10))]
    labels = [np.array([0]), np.array([0])]
    preds = [_b((0, 0, 10, 10)), _b()]
    ap = average_precision(preds, [np.array([0]), np.array([], dtype=np.int64)],
                           [np.array([0.9]), np.array([])], truth, labels)
    assert ap["map"] == pytest.approx(0.5)


def test_confident_false_positive_and_duplicates_are_penalised() -> None:
    truth = [_b((0, 0, 10, 10))]
    labels = [np.array([0])]
    # the top-scored box misses (IoU < 0.5), then a hit, then a duplicate of the hit
    preds = [_b((50, 50, 60, 60), (0, 0, 10, 10), (0, 0, 10, 9))]
    ap = average_precision(preds, [np.array([0, 0, 0])], [np.array([0.9, 0.8, 0.7])], truth,
                           labels)
    assert ap["map"] == pytest.approx(0.5)  # precision 1/2 at recall 1


def test_wrong_class_counts_only_when_class_aware() -> None:
    truth = [_b((0, 0, 10, 10))]
    preds = [_b((0, 0, 10, 10))]
    aware = average_precision(preds, [np.array([3])], [np.array([0.9])], truth, [np.array([1])])
    agnostic = average_precision(preds, [np.array([3])], [np.array([0.9])], truth,
                                 [np.array([1])], class_aware=False)
    assert aware["map"] == 0.0 and agnostic["map"] == 1.0


def test_a_box_under_two_categories_is_one_box_to_the_class_agnostic_figure() -> None:
    first, second = (0, 0, 10, 10), (20, 20, 30, 30)
    photos = PhotoSet(np.zeros((1, 40, 40, 3), np.uint8), [_b(first, second)], [np.array([1, 1])],
                      [np.array([7, 8])])

    def detect(images: np.ndarray) -> tuple[list, list, list]:
        # the first box as class 2 and then as class 1; the second box scores below both
        return ([_b(first, first, second)], [np.array([2, 1, 1])], [np.array([0.8, 0.6, 0.5])])

    result = evaluate_detector(detect, photos)
    assert result["ap50"] == pytest.approx(1.0)  # class 1: two detections, two hits
    # counted twice, the repeat would be a false positive ranked above the second hit (5/6)
    assert result["ap50_class_agnostic"] == pytest.approx(1.0)


def test_recall_at_k_known_ranking() -> None:
    refs = np.eye(4, dtype=np.float32)
    ref_ids = np.array([10, 11, 12, 13])
    queries = np.array([[1, 0, 0, 0], [0.9, 0.5, 0, 0], [0, 0, 0.2, 1]], dtype=np.float32)
    r = recall_at_k(queries, np.array([10, 11, 12]), refs, ref_ids, ks=(1, 2))
    assert r["recall@1"] == pytest.approx(1 / 3)
    assert r["recall@2"] == pytest.approx(1.0)


def test_colour_histograms_match_on_colour_and_ignore_layout() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(1, 8, 8, 3), dtype=np.uint8)
    shuffled = a.reshape(1, 64, 3)[:, rng.permutation(64)].reshape(1, 8, 8, 3)
    red = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    red[..., 0] = 250
    h = color_histograms(np.concatenate([a, shuffled, red]), bins=4)
    assert h.shape == (3, 64)
    assert np.allclose(np.linalg.norm(h, axis=1), 1.0)
    assert h[0] @ h[1] == pytest.approx(1.0, abs=1e-6)  # same colours, different layout
    assert h[0] @ h[2] < 0.5
