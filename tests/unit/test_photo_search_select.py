"""Which detections a photo search goes on with."""

from __future__ import annotations

from meshserve.gateway.model_wire import Detected
from meshserve.gateway.photo_search import select_detections

BOTTLE_BOX = (10.0, 20.0, 50.0, 90.0)
MUG_BOX = (60.0, 60.0, 100.0, 100.0)


def test_a_box_reported_under_two_categories_is_searched_once_under_the_better() -> None:
    found = [
        Detected(BOTTLE_BOX, "vase", 0.41),
        Detected(MUG_BOX, "mug", 0.9),
        Detected(BOTTLE_BOX, "bottle", 0.62),
        Detected((11.0, 20.0, 50.0, 90.0), "phone", 0.35),  # the same object, a hair apart
    ]
    kept = select_detections(found, min_score=0.3, labels=(), limit=16)
    assert [(d.label, d.score) for d in kept] == [("mug", 0.9), ("bottle", 0.62)]


def test_a_label_filter_keeps_the_alternative_category_it_asked_for() -> None:
    found = [Detected(BOTTLE_BOX, "bottle", 0.62), Detected(BOTTLE_BOX, "vase", 0.41)]
    kept = select_detections(found, min_score=0.3, labels=("vase",), limit=16)
    assert [(d.label, d.score) for d in kept] == [("vase", 0.41)]


def test_score_floor_and_limit_still_apply() -> None:
    found = [Detected((float(x), 0.0, x + 10.0, 10.0), "mug", 0.5 + x / 1000) for x in range(0, 200, 20)]
    found.append(Detected((300.0, 0.0, 310.0, 10.0), "mug", 0.2))
    kept = select_detections(found, min_score=0.3, labels=(), limit=3)
    assert [d.box[0] for d in kept] == [180.0, 160.0, 140.0]
