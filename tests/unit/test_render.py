"""The photo renderer: deterministic per (item, seed), boxes inside the image and on the product."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from meshserve.errors import InvalidInput
from meshserve.inference.crops import crop
from meshserve.training.catalogue import generate_items
from meshserve.training.render import RenderConfig, draw_product, render_photo

ITEMS = generate_items(40)


def test_same_item_and_seed_give_the_same_bytes() -> None:
    a = render_photo(ITEMS[3], 11)
    b = render_photo(ITEMS[3], 11)
    assert a.jpeg == b.jpeg
    assert np.array_equal(a.boxes, b.boxes)
    assert render_photo(ITEMS[3], 12).jpeg != a.jpeg
    assert render_photo(ITEMS[4], 11).jpeg != a.jpeg


@pytest.mark.parametrize("size", [96, 160])
def test_boxes_lie_inside_the_image_and_cover_the_product(size: int) -> None:
    cfg = RenderConfig(size=size)
    for k in range(40):
        pair = [ITEMS[k], ITEMS[(k * 7 + 1) % 40]] if k % 4 == 0 else [ITEMS[k]]
        if len(pair) == 2 and pair[0].item_id == pair[1].item_id:
            pair = pair[:1]
        photo = render_photo(pair, k, cfg)
        assert photo.image.shape == (size, size, 3) and photo.image.dtype == np.uint8
        assert len(photo.boxes) == len(pair)
        assert list(photo.item_ids) == [it.item_id for it in pair]
        assert list(photo.labels) == [it.category_index for it in pair]
        for x0, y0, x1, y1 in photo.boxes:
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert (x1 - x0) >= 0.1 * size or (y1 - y0) >= 0.1 * size


def test_look_alikes_differ_only_in_their_details() -> None:
    base = ITEMS[0].look
    other = replace(base, logo="star" if base.logo != "star" else "circle", logo_color="red")
    a, b = np.asarray(draw_product(base, 64)), np.asarray(draw_product(other, 64))
    assert a.shape == b.shape
    assert np.array_equal(a[..., 3], b[..., 3])  # same silhouette
    changed = np.any(a != b, axis=2)
    assert 0 < changed.mean() < 0.15  # a small region: the logo mark


def test_two_products_and_bad_requests() -> None:
    photo = render_photo(ITEMS[:2], 1)
    assert len(photo.boxes) == 2
    with pytest.raises(InvalidInput):
        render_photo([], 1)
    with pytest.raises(InvalidInput):
        render_photo(ITEMS[:3], 1)
    with pytest.raises(InvalidInput):
        RenderConfig(size=8)


def test_crop_resizes_and_rejects_empty_boxes() -> None:
    img = np.zeros((50, 60, 3), dtype=np.uint8)
    img[10:20, 10:30] = 255
    out = crop(img, (10, 10, 30, 20), 16)
    assert out.shape == (16, 16, 3) and out[3:-3, 3:-3].min() == 255  # edges blend a little
    assert crop(img, (-10, -10, 100, 100), 8).shape == (8, 8, 3)  # clipped to the image
    with pytest.raises(InvalidInput):
        crop(img, (70, 70, 90, 90), 8)


def test_a_photo_cropped_as_a_pil_image_gives_the_same_crop() -> None:
    img = np.random.default_rng(1).integers(0, 255, (50, 60, 3), dtype=np.uint8)
    photo = Image.fromarray(img)
    for box in [(10, 10, 30, 20), (-5, 3, 70, 41.5), (0.5, 0.5, 2.5, 2)]:
        assert np.array_equal(crop(photo, box, 16, 0.12), crop(img, box, 16, 0.12))
    with pytest.raises(InvalidInput):
        crop(photo, (70, 70, 90, 90), 8)
