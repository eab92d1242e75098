"""The synthetic catalogue: deterministic, look-alike but unique items, and its SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve import warehouse
from meshserve.errors import InvalidInput, NotFound
from meshserve.inference.vocabulary import SHIPPING_SIZES, VIOLATIONS
from meshserve.training import catalogue as cat


def test_same_seed_same_items_and_prefix_stable() -> None:
    a = cat.generate_items(120, seed=5)
    b = cat.generate_items(120, seed=5)
    assert a == b
    assert cat.generate_items(40, seed=5) == a[:40]  # a small catalogue is a prefix
    assert cat.generate_items(40, seed=6) != a[:40]


def test_items_look_alike_within_a_category_but_never_identical() -> None:
    items = cat.generate_items(600)
    assert len({it.category for it in items}) >= 12
    keys = [it.look.key() for it in items]
    assert len(set(keys)) == len(keys)
    for name, spec in cat.CATEGORIES.items():
        mine = [it for it in items if it.category == name]
        assert mine, name
        assert {it.look.shape for it in mine} == {name}  # one shape family per category
        assert {it.look.body_color for it in mine} <= set(spec["body"])  # a shared house palette


def test_fields_are_sane() -> None:
    items = cat.generate_items(300)
    ids = [it.item_id for it in items]
    assert ids == list(range(300))
    assert all(it.price > 0 and it.weight_kg > 0 and it.width_cm > 0 for it in items)
    assert all(it.shipping_size in SHIPPING_SIZES for it in items)
    times = [it.listed_at for it in items]
    assert times == sorted(times)  # listings arrive in id order
    for v in VIOLATIONS:
        rate = sum(it.label(v) for it in items) / len(items)
        assert 0.04 < rate < 0.25, (v, rate)
    with pytest.raises(InvalidInput):
        items[0].label("nonsense")


def test_violation_cues_are_informative_but_noisy() -> None:
    items = cat.generate_items(1500)
    for v in VIOLATIONS:
        strong = cat._CUES[v]["strong"]
        has_cue = [any(s.lower() in (it.title + " " + it.description).lower() for s in strong)
                   for it in items]
        pos = [h for h, it in zip(has_cue, items, strict=True) if it.label(v)]
        neg = [h for h, it in zip(has_cue, items, strict=True) if not it.label(v)]
        assert 0.8 < sum(pos) / len(pos) < 1.0  # mostly there, not always
        assert 0.0 < sum(neg) / len(neg) < 0.06  # some clean listings carry it too


def test_store_round_trip_and_queries(tmp_path: Path) -> None:
    path = cat.build_catalogue(50, seed=3, home=tmp_path)
    assert path == tmp_path / warehouse.CATALOGUE_FILE
    items = cat.load_items(tmp_path)
    assert items == cat.generate_items(50, seed=3)
    assert cat.get_item(7, tmp_path) == items[7]
    assert [it.item_id for it in cat.items_by_id_range(10, 13, tmp_path)] == [10, 11, 12]
    lo, hi = items[5].listed_at, items[9].listed_at
    assert [it.item_id for it in cat.items_by_time(lo, hi, tmp_path)] == [5, 6, 7, 8]
    mugs = cat.load_items(tmp_path, category="mug")
    assert mugs and all(it.category == "mug" for it in mugs)
    assert cat.load_items(tmp_path, ids=[]) == []
    assert cat.catalogue_meta(tmp_path) == {"seed": "3", "n_items": "50", "schema": "1"}
    with pytest.raises(NotFound):
        cat.get_item(50, tmp_path)
    with pytest.raises(InvalidInput):
        cat.load_items(tmp_path, category="spaceship")


def test_missing_store_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="meshserve train"):
        cat.load_items(tmp_path)
