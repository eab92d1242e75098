"""Photo renderer: draws a catalogue item's look in a cluttered, badly lit, compressed photo."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from meshserve.errors import InvalidInput
from meshserve.inference.vocabulary import CATEGORY_NAMES
from meshserve.training.catalogue import PALETTE, Item, Look

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class RenderConfig:
    """How photos are taken; the defaults are what detector training and evaluation see."""

    size: int = 160
    min_scale: float = 0.35  # product's longer side as a fraction of the photo side
    max_scale: float = 0.7
    two_product_scale: tuple[float, float] = (0.32, 0.5)
    max_rotation: float = 30.0
    p_distractor: float = 0.6
    max_distractors: int = 3
    clutter: tuple[int, int] = (6, 16)
    jpeg_quality: tuple[int, int] = (35, 95)
    p_blur: float = 0.5
    max_blur: float = 1.1
    max_noise: float = 9.0

    def __post_init__(self) -> None:
        if not 32 <= self.size <= 2048:
            raise InvalidInput(f"render size must be in [32, 2048], got {self.size}")
        if not 0.05 < self.min_scale <= self.max_scale <= 1.0:
            raise InvalidInput("need 0.05 < min_scale <= max_scale <= 1")


# Embedder training renders one product close up on a smaller canvas: same looks, lighting,
# clutter and compression, a quarter of the pixels.
CROP_CONFIG = RenderConfig(size=96, min_scale=0.55, max_scale=0.9, p_distractor=0.3,
                           max_distractors=1, clutter=(3, 8))


@dataclass(frozen=True)
class Photo:
    """A rendered photo and its ground truth."""

    image: np.ndarray  # uint8 [H, W, 3], the decoded JPEG
    jpeg: bytes
    boxes: np.ndarray  # float32 [n, 4] x0, y0, x1, y1 in pixels
    labels: np.ndarray  # int64 [n] category index
    item_ids: np.ndarray  # int64 [n]


# --------------------------------------------------------------------------- shapes
# Every family draws in a unit box (x right, y down) scaled to the sprite; `body` parts get
# the body colour and pattern, `accent` parts the accent colour. BODY_BOX is where the logo
# and the small parts sit.

Pt = tuple[float, float]
Draw = Callable[[str, Sequence[Pt]], None]


def _mug(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    a("accent", [(0.55, 0.28), (1.0, 0.78), (0.09, 0)])  # handle ring: box + width
    r("body", [(0.04, 0.1), (0.74, 0.96)])
    r("accent", [(0.04, 0.1), (0.74, 0.18)])


def _bottle(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    r("accent", [(0.33, 0.0), (0.67, 0.1)])
    p("body", [(0.38, 0.1), (0.62, 0.1), (0.62, 0.2), (0.96, 0.34), (0.96, 1.0), (0.04, 1.0),
               (0.04, 0.34), (0.38, 0.2)])


def _sneaker(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    p("body", [(0.02, 0.42), (0.32, 0.34), (0.48, 0.04), (0.76, 0.04), (0.8, 0.42), (0.98, 0.58),
               (0.98, 0.82), (0.02, 0.82)])
    r("accent", [(0.0, 0.8), (1.0, 1.0)])
    r("accent", [(0.74, 0.02), (0.8, 0.42)])


def _backpack(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    a("accent", [(0.3, 0.0), (0.7, 0.22), (0.08, 0)])
    r("body", [(0.04, 0.1), (0.96, 1.0)])
    r("accent", [(0.18, 0.62), (0.82, 0.93)])


def _lamp(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    p("body", [(0.24, 0.0), (0.76, 0.0), (1.0, 0.46), (0.0, 0.46)])
    r("accent", [(0.45, 0.46), (0.55, 0.9)])
    e("accent", [(0.12, 0.87), (0.88, 1.0)])


def _chair(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    r("body", [(0.1, 0.0), (0.9, 0.5)])
    r("accent", [(0.0, 0.5), (1.0, 0.62)])
    r("accent", [(0.04, 0.62), (0.16, 1.0)])
    r("accent", [(0.84, 0.62), (0.96, 1.0)])


def _watch(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    r("accent", [(0.18, 0.0), (0.82, 0.3)])
    r("accent", [(0.18, 0.7), (0.82, 1.0)])
    e("body", [(0.0, 0.24), (1.0, 0.76)])


def _headphones(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    a("accent", [(0.08, 0.0), (0.92, 1.1), (0.09, 1)])  # upper half of a ring: the band
    e("body", [(0.0, 0.42), (0.4, 1.0)])
    e("body", [(0.6, 0.42), (1.0, 1.0)])


def _handbag(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    a("accent", [(0.25, 0.0), (0.75, 0.62), (0.07, 1)])
    p("body", [(0.14, 0.3), (0.86, 0.3), (1.0, 1.0), (0.0, 1.0)])
    p("accent", [(0.14, 0.3), (0.86, 0.3), (0.5, 0.52)])


def _teapot(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    a("accent", [(0.0, 0.34), (0.32, 0.82), (0.07, 0)])
    p("accent", [(0.74, 0.5), (1.0, 0.22), (1.0, 0.34), (0.78, 0.76)])
    e("body", [(0.18, 0.2), (0.82, 1.0)])
    e("accent", [(0.36, 0.1), (0.64, 0.28)])


def _vase(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    p("body", [(0.3, 0.0), (0.7, 0.0), (0.64, 0.16), (1.0, 0.55), (0.8, 1.0), (0.2, 1.0),
               (0.0, 0.55), (0.36, 0.16)])
    r("accent", [(0.27, 0.0), (0.73, 0.06)])


def _phone(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    r("body", [(0.0, 0.0), (1.0, 1.0)])
    r("accent", [(0.08, 0.04), (0.42, 0.24)])


def _book(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    r("body", [(0.1, 0.0), (1.0, 1.0)])
    r("accent", [(0.0, 0.0), (0.14, 1.0)])
    r("accent", [(0.14, 0.9), (1.0, 0.96)])


def _tshirt(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    p("body", [(0.3, 0.0), (0.42, 0.07), (0.58, 0.07), (0.7, 0.0), (1.0, 0.2), (0.87, 0.38),
               (0.78, 0.3), (0.78, 1.0), (0.22, 1.0), (0.22, 0.3), (0.13, 0.38), (0.0, 0.2)])
    p("accent", [(0.3, 0.0), (0.42, 0.07), (0.58, 0.07), (0.7, 0.0), (0.62, 0.0), (0.5, 0.04),
                 (0.38, 0.0)])


def _umbrella(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    p("body", [(0.5 + 0.5 * math.cos(t), 0.62 - 0.62 * math.sin(t))
               for t in np.linspace(0.0, math.pi, 17)])
    r("accent", [(0.47, 0.6), (0.53, 0.92)])
    a("accent", [(0.33, 0.8), (0.53, 1.0), (0.05, 2)])  # lower half ring: the hook


def _guitar(p: Draw, e: Draw, r: Draw, a: Draw) -> None:
    r("accent", [(0.42, 0.0), (0.58, 0.45)])
    r("accent", [(0.36, 0.0), (0.64, 0.07)])
    e("body", [(0.08, 0.3), (0.92, 0.7)])
    e("body", [(0.0, 0.5), (1.0, 1.0)])


# family: (drawer, base width/height, body box for logo and parts)
FAMILIES: dict[str, tuple[Callable[..., None], float, Box]] = {
    "mug": (_mug, 1.0, (0.08, 0.22, 0.7, 0.92)),
    "bottle": (_bottle, 0.42, (0.1, 0.38, 0.9, 0.96)),
    "sneaker": (_sneaker, 2.1, (0.3, 0.36, 0.74, 0.78)),
    "backpack": (_backpack, 0.76, (0.1, 0.14, 0.9, 0.58)),
    "lamp": (_lamp, 0.62, (0.16, 0.04, 0.84, 0.44)),
    "chair": (_chair, 0.62, (0.14, 0.04, 0.86, 0.48)),
    "watch": (_watch, 0.4, (0.15, 0.32, 0.85, 0.68)),
    "headphones": (_headphones, 0.95, (0.04, 0.5, 0.36, 0.94)),
    "handbag": (_handbag, 1.25, (0.12, 0.52, 0.88, 0.96)),
    "teapot": (_teapot, 1.35, (0.26, 0.34, 0.74, 0.92)),
    "vase": (_vase, 0.56, (0.15, 0.34, 0.85, 0.92)),
    "phone": (_phone, 0.5, (0.1, 0.3, 0.9, 0.95)),
    "book": (_book, 0.7, (0.18, 0.06, 0.96, 0.86)),
    "tshirt": (_tshirt, 1.0, (0.25, 0.16, 0.75, 0.95)),
    "umbrella": (_umbrella, 1.15, (0.14, 0.2, 0.86, 0.58)),
    "guitar": (_guitar, 0.42, (0.16, 0.58, 0.84, 0.95)),
}
assert set(FAMILIES) == set(CATEGORY_NAMES)

_PATTERN_PERIOD = (0.1, 0.15, 0.22)  # of the sprite's shorter side, per pattern_scale


@lru_cache(maxsize=256)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return ys, xs


def _ramp(s: int, angle: float, gain: float) -> np.ndarray:
    """A linear ramp over an s×s image, zero at the centre, about ±gain/2 at the edges."""
    line = (np.arange(s, dtype=np.float32) / s - 0.5) * np.float32(gain)
    return line[None, :] * np.float32(math.cos(angle)) + line[:, None] * np.float32(math.sin(angle))


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Fixed Gaussian sensor noise to take windows from: drawing it per photo costs more."""
    return np.random.default_rng(7).standard_normal((640, 640, 3), dtype=np.float32)


def _pattern_mask(look: Look, h: int, w: int) -> np.ndarray:
    ys, xs = _grid(h, w)
    period = max(3.0, _PATTERN_PERIOD[look.pattern_scale] * min(h, w))
    half = period / 2
    kind = look.pattern
    if kind == "hstripes":
        return (ys % period) < half
    if kind == "vstripes":
        return (xs % period) < half
    if kind == "diagonal":
        return ((xs + ys) % period) < half
    if kind == "checks":
        return ((xs % period) < half) ^ ((ys % period) < half)
    if kind == "dots":
        dx = xs % period - half
        dy = ys % period - half
        return dx * dx + dy * dy < (0.3 * period) ** 2
    if kind == "band":
        return np.abs(ys - 0.55 * h) < 0.12 * h
    return np.zeros((h, w), dtype=bool)


def _logo_polygon(kind: str, cx: float, cy: float, r: float) -> list[Pt]:
    if kind == "triangle":
        return [(cx, cy - r), (cx + 0.87 * r, cy + 0.5 * r), (cx - 0.87 * r, cy + 0.5 * r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if kind == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    return []


def _draw_logo(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
               color: tuple[int, int, int]) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(r * 0.45)))
    elif kind == "square":
        s = 0.8 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif kind == "cross":
        t = 0.32 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)
    elif kind in ("triangle", "diamond", "star"):
        draw.polygon(_logo_polygon(kind, cx, cy, r), fill=color)


def draw_product(look: Look, height_px: int) -> Image.Image:
    """The product as an RGBA sprite `height_px` tall, unrotated, unlit."""
    drawer, base_aspect, body_box = FAMILIES[look.shape]
    h = max(8, int(height_px))
    w = max(8, int(round(h * base_aspect * look.aspect)))
    masks = {"body": Image.new("L", (w, h), 0), "accent": Image.new("L", (w, h), 0)}
    pens = {k: ImageDraw.Draw(m) for k, m in masks.items()}

    def sc(pts: Sequence[Pt]) -> list[Pt]:
        return [(x * (w - 1), y * (h - 1)) for x, y in pts]

    def poly(part: str, pts: Sequence[Pt]) -> None:
        pens[part].polygon(sc(pts), fill=255)

    def ell(part: str, pts: Sequence[Pt]) -> None:
        pens[part].ellipse(sc(pts), fill=255)

    def rect(part: str, pts: Sequence[Pt]) -> None:
        pens[part].rectangle(sc(pts), fill=255)

    def arc(part: str, pts: Sequence[Pt]) -> None:
        (x0, y0), (x1, y1) = sc(pts[:2])
        width = max(2, int(pts[2][0] * min(w, h)))
        start, end = {0: (0, 360), 1: (180, 360), 2: (0, 180)}[int(pts[2][1])]
        pens[part].arc([x0, y0, x1, y1], start, end, fill=255, width=width)

    drawer(poly, ell, rect, arc)
    body = np.asarray(masks["body"]) > 0
    accent = np.asarray(masks["accent"]) > 0
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    rgb[:] = PALETTE[look.body_color]
    if look.pattern != "plain":
        rgb[_pattern_mask(look, h, w) & body] = PALETTE[look.pattern_color]
    rgb[accent] = PALETTE[look.accent_color]
    alpha = ((body | accent) * 255).astype(np.uint8)
    sprite = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    pen = ImageDraw.Draw(sprite)
    bx0, by0, bx1, by1 = body_box
    bw, bh = (bx1 - bx0) * w, (by1 - by0) * h
    if look.logo != "none":
        r = 0.2 * min(bw, bh)
        cx = bx0 * w + r + (bw - 2 * r) * look.logo_pos[0]
        cy = by0 * h + r + (bh - 2 * r) * look.logo_pos[1] * 0.75
        _draw_logo(pen, look.logo, cx, cy, r, PALETTE[look.logo_color])
    if look.n_parts:
        pr = max(1.5, 0.07 * min(bw, bh))
        y = by1 * h - 2.2 * pr
        step = 3.2 * pr
        x_start = (bx0 + bx1) / 2 * w - step * (look.n_parts - 1) / 2
        for k in range(look.n_parts):
            x = x_start + k * step
            pen.ellipse([x - pr, y - pr, x + pr, y + pr], fill=PALETTE[look.part_color])
    return sprite


# --------------------------------------------------------------------------- scenes


def _rng_for(item_ids: Sequence[int], seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, item_ids), 0x9E0]))


def _rand_color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    c = rng.integers(lo, hi, size=3)
    return int(c[0]), int(c[1]), int(c[2])


def _background(rng: np.random.Generator, cfg: RenderConfig) -> Image.Image:
    s = cfg.size
    c0 = np.array(_rand_color(rng, 60, 240), dtype=np.float32)
    c1 = np.array(_rand_color(rng, 60, 240), dtype=np.float32)
    t = _ramp(16, rng.uniform(0, 2 * math.pi), 1 / 1.42)[..., None] + 0.5
    base = (c0 * (1 - t) + c1 * t).astype(np.uint8)  # a smooth ramp: draw small, scale up
    img = Image.fromarray(base, "RGB").resize((s, s), Image.Resampling.BILINEAR)
    pen = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1))):
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * s
        ww, hh = rng.uniform(0.05, 0.45, size=2) * s
        color = _rand_color(rng, 30, 230)
        kind = int(rng.integers(4))
        if kind == 0:
            pen.rectangle([x0, y0, x0 + ww, y0 + hh], fill=color)
        elif kind == 1:
            pen.ellipse([x0, y0, x0 + ww, y0 + hh], fill=color)
        elif kind == 2:
            pen.line([x0, y0, x0 + ww, y0 + hh], fill=color, width=int(rng.integers(1, 5)))
        else:
            pts = [(x0 + rng.uniform(0, ww), y0 + rng.uniform(0, hh)) for _ in range(3)]
            pen.polygon(pts, fill=color)
    if rng.random() < 0.5:  # out of focus: a cheap blur by going down and up in size
        f = float(rng.uniform(0.3, 0.6))
        small = img.resize((max(4, int(s * f)), max(4, int(s * f))), Image.Resampling.BILINEAR)
        img = small.resize((s, s), Image.Resampling.BILINEAR)
    return img


def _distractor(rng: np.random.Generator, cfg: RenderConfig) -> Image.Image:
    """A non-product object: an irregular blob, sometimes striped."""
    size = int(rng.uniform(0.12, 0.35) * cfg.size) + 6
    n = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * math.pi, size=n))
    radii = rng.uniform(0.25, 0.5, size=n) * size
    pts = [(size / 2 + r * math.cos(a), size / 2 + r * math.sin(a))
           for a, r in zip(angles, radii, strict=True)]
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    rgb = np.empty((size, size, 3), dtype=np.uint8)
    rgb[:] = _rand_color(rng)
    if rng.random() < 0.4:
        ys, _ = _grid(size, size)
        rgb[(ys % 6) < 3] = _rand_color(rng)
    return Image.fromarray(np.dstack([rgb, np.asarray(mask)]), "RGBA")


_SHADOW_LUT = [a * 2 // 5 for a in range(256)]
_SOLID_LUT = [255 if a > 96 else 0 for a in range(256)]


def _place(canvas: Image.Image, sprite: Image.Image, x: int, y: int, shadow: bool) -> None:
    alpha = sprite.getchannel("A")
    if shadow:
        dark = Image.new("RGB", sprite.size, (15, 15, 20))
        canvas.paste(dark, (x + 3, y + 3), alpha.point(_SHADOW_LUT))
    canvas.paste(sprite.convert("RGB"), (x, y), alpha)


def _overlap(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter / max(smaller, 1e-6)


def _lighting(img: Image.Image, rng: np.random.Generator, cfg: RenderConfig) -> np.ndarray:
    s = cfg.size
    grad = 1.0 + rng.uniform(0.0, 0.5) * _ramp(s, rng.uniform(0, 2 * math.pi), 1.0)
    cast = rng.uniform(0.82, 1.18, size=3).astype(np.float32) * rng.uniform(0.65, 1.25)
    out = np.asarray(img, dtype=np.float32) * grad[..., None] * cast
    noise_sigma = rng.uniform(0.0, cfg.max_noise)
    if noise_sigma > 0.5:
        bank = _noise_bank()
        oy, ox = rng.integers(0, bank.shape[0] - s + 1, size=2)
        out += bank[oy:oy + s, ox:ox + s] * np.float32(noise_sigma)
    return np.clip(out, 0, 255).astype(np.uint8)


def render_photo(items: Item | Sequence[Item], seed: int, cfg: RenderConfig = RenderConfig()
                 ) -> Photo:
    """A photo of one or two catalogue items; deterministic for (items, seed, cfg)."""
    products = [items] if isinstance(items, Item) else list(items)
    if not 1 <= len(products) <= 2:
        raise InvalidInput(f"a photo shows one or two products, got {len(products)}")
    rng = _rng_for([it.item_id for it in products], seed)
    s = cfg.size
    canvas = _background(rng, cfg)
    if rng.random() < cfg.p_distractor:
        for _ in range(int(rng.integers(1, cfg.max_distractors + 1))):
            d = _distractor(rng, cfg).rotate(float(rng.uniform(0, 360)), expand=True)
            x = int(rng.integers(-d.width // 3, s - d.width * 2 // 3))
            y = int(rng.integers(-d.height // 3, s - d.height * 2 // 3))
            _place(canvas, d, x, y, shadow=rng.random() < 0.5)
    lo, hi = (cfg.min_scale, cfg.max_scale) if len(products) == 1 else cfg.two_product_scale
    boxes: list[Box] = []
    for item in products:
        aspect = FAMILIES[item.look.shape][1] * item.look.aspect
        longer = rng.uniform(lo, hi) * s
        height = longer if aspect <= 1 else longer / aspect
        sprite = draw_product(item.look, int(height))
        sprite = sprite.rotate(float(rng.uniform(-cfg.max_rotation, cfg.max_rotation)),
                               resample=Image.Resampling.BILINEAR, expand=True)
        if max(sprite.size) > s:  # rotation grew it past the frame: shrink to fit
            f = (s - 2) / max(sprite.size)
            sprite = sprite.resize((max(4, int(sprite.width * f)), max(4, int(sprite.height * f))),
                                   Image.Resampling.BILINEAR)
        bbox = sprite.getchannel("A").point(_SOLID_LUT).getbbox()
        if bbox is None:  # pragma: no cover - a sprite always has a body
            continue
        for _attempt in range(12):
            x = int(rng.integers(0, s - sprite.width + 1))
            y = int(rng.integers(0, s - sprite.height + 1))
            box = (x + bbox[0], y + bbox[1], x + bbox[2], y + bbox[3])
            if all(_overlap(box, other) < 0.15 for other in boxes):
                break
        _place(canvas, sprite, x, y, shadow=rng.random() < 0.6)
        boxes.append(tuple(float(v) for v in box))  # type: ignore[arg-type]
    pixels = _lighting(canvas, rng, cfg)
    img = Image.fromarray(pixels, "RGB")
    if rng.random() < cfg.p_blur:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, cfg.max_blur))))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(cfg.jpeg_quality[0],
                                                          cfg.jpeg_quality[1] + 1)))
    jpeg = buf.getvalue()
    image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    return Photo(
        image=image,
        jpeg=jpeg,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray([it.category_index for it in products], dtype=np.int64),
        item_ids=np.asarray([it.item_id for it in products], dtype=np.int64),
    )
