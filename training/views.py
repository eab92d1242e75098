"""Embedder training views made in torch: each item's sprite, warped, relit and cropped in batches.

The PIL renderer costs milliseconds per photo; metric learning wants tens of thousands of
views. So each item's sprite is drawn once by the renderer and every view is a batched tensor
warp of it over backgrounds the renderer drew, with the renderer's kinds of lighting, blur
and noise. Evaluation still uses real rendered photos only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from meshserve.inference.crops import CROP_PAD
from meshserve.training.catalogue import Item
from meshserve.training.datasets import VIEW_CONFIG
from meshserve.training.render import FAMILIES, _background, _distractor, _place, draw_product

_MEAN, _STD = 0.5, 0.25


class SpriteViews:
    """Sprites of `items` on a square canvas plus a bank of cluttered backgrounds."""

    def __init__(self, items: Sequence[Item], canvas: int = 80, n_backgrounds: int = 192,
                 seed: int = 0):
        self.canvas = canvas
        sprites = np.zeros((len(items), canvas, canvas, 4), dtype=np.uint8)
        for k, item in enumerate(items):
            aspect = FAMILIES[item.look.shape][1] * item.look.aspect
            longer = 0.62 * canvas
            sprite = draw_product(item.look, int(longer if aspect <= 1 else longer / aspect))
            w, h = sprite.size
            x, y = (canvas - w) // 2, (canvas - h) // 2
            sprites[k, y:y + h, x:x + w] = np.asarray(sprite)
        self.sprites = torch.from_numpy(sprites).permute(0, 3, 1, 2).contiguous()
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB6]))
        cfg = replace(VIEW_CONFIG, size=canvas)
        bgs = []
        for _ in range(n_backgrounds):
            bg = _background(rng, cfg)
            if rng.random() < cfg.p_distractor:
                d = _distractor(rng, cfg).rotate(float(rng.uniform(0, 360)), expand=True)
                _place(bg, d, int(rng.integers(-d.width // 3, canvas - d.width // 2)),
                       int(rng.integers(-d.height // 3, canvas - d.height // 2)), shadow=False)
            bgs.append(np.asarray(bg.convert("RGB"), dtype=np.uint8))
        self.backgrounds = torch.from_numpy(np.stack(bgs)).permute(0, 3, 1, 2).contiguous()
        line = torch.linspace(-0.5, 0.5, canvas)
        self._gx, self._gy = line[None, :].expand(canvas, canvas), line[:, None].expand(canvas,
                                                                                       canvas)

    def __len__(self) -> int:
        return len(self.sprites)

    def batch(self, idx: torch.Tensor, out: int, gen: torch.Generator, jitter: float = 0.06
              ) -> torch.Tensor:
        """Normalised views [len(idx), 3, out, out] of items idx, channels_last; `jitter` moves
        each crop edge by up to that share of the box, as an imprecise detector would."""
        b, c = len(idx), self.canvas

        def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=gen)

        spr = self.sprites[idx].float() / 255.0
        ang = u(-30, 30) * math.pi / 180
        scale = u(0.8, 1.25)  # >1 zooms out
        stretch = u(0.92, 1.08)
        cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
        theta = torch.stack([
            torch.stack([cos * stretch, -sin, u(-0.15, 0.15)], 1),
            torch.stack([sin * stretch, cos, u(-0.15, 0.15)], 1),
        ], 1)
        grid = F.affine_grid(theta, [b, 4, c, c], align_corners=False)
        spr = F.grid_sample(spr, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        rgb, alpha = spr[:, :3], spr[:, 3:4]
        bg = self.backgrounds[torch.randint(len(self.backgrounds), (b,), generator=gen)].float()
        bg = bg / 255.0
        flip = torch.rand(b, generator=gen) < 0.5
        bg[flip] = bg[flip].flip(3)
        shadow = torch.roll(alpha, shifts=(2, 2), dims=(2, 3)) * u(0.0, 0.45, b, 1, 1, 1)
        img = (bg * (1 - shadow)) * (1 - alpha) + rgb * alpha

        ramp_ang = u(0, 2 * math.pi)
        ramp = self._gx * torch.cos(ramp_ang)[:, None, None] + self._gy * torch.sin(ramp_ang)[
            :, None, None]
        light = 1 + u(0.0, 0.5)[:, None, None] * ramp
        cast = u(0.82, 1.18, b, 3, 1, 1) * u(0.65, 1.25, b, 1, 1, 1)
        img = img * light[:, None] * cast
        blurred = torch.rand(b, generator=gen) < 0.5
        if blurred.any():
            w = u(0.3, 1.0, int(blurred.sum()), 1, 1, 1)
            img[blurred] = img[blurred] * (1 - w) + _blur(img[blurred]) * w
        oy, ox = torch.randint(0, _NOISE_SIDE - c + 1, (2,), generator=gen).tolist()
        noise = _noise_bank()[:, oy:oy + c, ox:ox + c]
        img = (img + noise * u(0.0, 9 / 255, b, 1, 1, 1)).clamp(0, 1)

        boxes = _alpha_boxes(alpha[:, 0] > 0.4)
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        shift = u(-jitter, jitter, b, 4) * wh
        grow = torch.tensor([-1.0, -1.0, 1.0, 1.0]) * CROP_PAD * wh
        boxes = (boxes + grow + shift).clamp(0, c)
        # the crop as one more affine warp: output [-1, 1] spans the box
        centre = (boxes[:, :2] + boxes[:, 2:]) / c - 1
        half = (boxes[:, 2:] - boxes[:, :2]) / c
        zero = torch.zeros(b)
        theta = torch.stack([torch.stack([half[:, 0], zero, centre[:, 0]], 1),
                             torch.stack([zero, half[:, 1], centre[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, [b, 3, out, out], align_corners=False)
        crops = F.grid_sample(img, grid, mode="bilinear", padding_mode="border",
                              align_corners=False)
        return ((crops - _MEAN) / _STD).contiguous(memory_format=torch.channels_last)


_NOISE_SIDE = 256


@lru_cache(maxsize=1)
def _noise_bank() -> torch.Tensor:
    return torch.randn(3, _NOISE_SIDE, _NOISE_SIDE, generator=torch.Generator().manual_seed(7))


def _blur(x: torch.Tensor) -> torch.Tensor:
    """A [1 2 1]/4 blur both ways by shifted sums: depthwise convs are slow on CPU."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h = (p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]) / 4
    return (h[..., :-2, :] + 2 * h[..., 1:-1, :] + h[..., 2:, :]) / 4


def _alpha_boxes(mask: torch.Tensor) -> torch.Tensor:
    """Tight boxes [b, 4] (x0, y0, x1, y1) of boolean masks [b, H, W]; whole image if empty."""
    b, h, w = mask.shape
    cols, rows = mask.any(1), mask.any(2)
    xs = torch.arange(w, dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32)
    big = torch.tensor(1e9)
    x0 = torch.where(cols, xs, big).amin(1)
    x1 = torch.where(cols, xs, -big).amax(1) + 1
    y0 = torch.where(rows, ys, big).amin(1)
    y1 = torch.where(rows, ys, -big).amax(1) + 1
    empty = ~cols.any(1)
    boxes = torch.stack([x0, y0, x1, y1], 1)
    boxes[empty] = torch.tensor([0.0, 0.0, float(w), float(h)])
    return boxes


def to_image(view: torch.Tensor) -> Image.Image:
    """A normalised view back to a PIL image (for looking at what training sees)."""
    arr = ((view.float() * _STD + _MEAN).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))
