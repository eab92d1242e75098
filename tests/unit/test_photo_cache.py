"""Rendered photo sets: chunked on-disk cache, and rendering ahead in a background process."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from meshserve.training import datasets
from meshserve.training.catalogue import generate_items
from meshserve.training.datasets import PhotoRequest, rendered_meanwhile

ITEMS = generate_items(12)


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MESHSERVE_RENDER_WORKERS", "1")
    monkeypatch.setattr(datasets, "PHOTO_CHUNK", 4)


def _cached(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "home" / "cache" / "renders").glob("photos-*.npz"))


def _same(a: datasets.PhotoSet, b: datasets.PhotoSet) -> bool:
    return (np.array_equal(a.images, b.images) and len(a.boxes) == len(b.boxes)
            and all(np.array_equal(x, y) for x, y in zip(a.boxes + a.labels + a.item_ids,
                                                         b.boxes + b.labels + b.item_ids,
                                                         strict=True)))


def test_a_set_is_cached_in_chunks_and_a_missing_chunk_is_rendered_again(tmp_path: Path) -> None:
    request = PhotoRequest(ITEMS, 10, datasets.EVAL_SEEDS, p_two=0.5)
    fresh = datasets.render_photos(ITEMS, 10, datasets.EVAL_SEEDS, p_two=0.5, cache=False)
    first = request.render()
    assert _same(first, fresh) and len(first.images) == 10
    chunks = _cached(tmp_path)
    assert len(chunks) == 3  # 4 + 4 + 2 photos

    chunks[1].unlink()
    again = request.render()
    assert _same(again, fresh)
    assert len(_cached(tmp_path)) == 3

    # a shorter set is the start of the longer one and reads its whole chunks
    shorter = PhotoRequest(ITEMS, 8, datasets.EVAL_SEEDS, p_two=0.5).render()
    assert len(_cached(tmp_path)) == 3
    assert np.array_equal(shorter.images, fresh.images[:8])
    assert PhotoRequest(ITEMS, 9, datasets.EVAL_SEEDS, p_two=0.5).render().images.shape[0] == 9
    assert len(_cached(tmp_path)) == 4  # its last chunk holds 1 photo, not 2


def test_photos_rendered_ahead_are_read_from_the_cache(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    request = PhotoRequest(ITEMS, 6, datasets.TRAIN_SEEDS)
    with rendered_meanwhile([request]):
        deadline = time.monotonic() + 60
        while len(_cached(tmp_path)) < 2:
            assert time.monotonic() < deadline, "the background process rendered nothing"
            time.sleep(0.05)
    fresh = datasets.render_photos(ITEMS, 6, datasets.TRAIN_SEEDS, cache=False)

    def no_rendering(*args: object, **kwargs: object) -> list[tuple]:
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(datasets, "_run", no_rendering)
    assert _same(request.render(), fresh)


def test_a_rendering_cut_short_keeps_its_whole_chunks(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    request = PhotoRequest(ITEMS, 200, datasets.TRAIN_SEEDS)
    with rendered_meanwhile([request]):
        deadline = time.monotonic() + 60
        while not _cached(tmp_path):
            assert time.monotonic() < deadline, "the background process rendered nothing"
            time.sleep(0.01)
    renders = tmp_path / "home" / "cache" / "renders"
    assert not list(renders.glob(".*"))  # no half-written file of the stopped process
    kept = len(_cached(tmp_path))
    assert 1 <= kept < 50

    rendered: list[int] = []
    run = datasets._run

    def counting(jobs, *args, **kwargs):  # type: ignore[no-untyped-def]
        rendered.append(len(jobs))
        return run(jobs, *args, **kwargs)

    monkeypatch.setattr(datasets, "_run", counting)
    photos = request.render()
    assert sum(rendered) == 200 - 4 * kept  # only what the stopped process had not finished
    assert _same(photos, datasets.render_photos(ITEMS, 200, datasets.TRAIN_SEEDS, cache=False))
