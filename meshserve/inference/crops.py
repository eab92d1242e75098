"""Crops the crop networks read: a box, grown a little and clipped, resized to a square."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from meshserve.errors import InvalidInput

CROP_PAD = 0.06  # crops are the box grown a little, as a detector box is never exact


def crop(image: np.ndarray | Image.Image, box: Sequence[float] | np.ndarray, out: int, pad: float = 0.0) -> np.ndarray:
    """The box (grown by `pad` of its size, clipped) resized to out×out, uint8 [out, out, 3].
    Cropping many boxes of one photo, pass it as a PIL image: converting it costs as much as
    the crop."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    w, h = pil.size
    x0, y0, x1, y1 = (float(v) for v in box)
    px, py = (x1 - x0) * pad, (y1 - y0) * pad
    x0, y0 = max(0.0, x0 - px), max(0.0, y0 - py)
    x1, y1 = min(float(w), x1 + px), min(float(h), y1 + py)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise InvalidInput(f"box {tuple(box)} is empty inside a {w}x{h} image")
    return np.asarray(pil.resize((out, out), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1)))
