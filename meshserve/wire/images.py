"""Safe image decoding: encoded bytes → RGB uint8 array; bombs and junk refused before they cost."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from meshserve.errors import InvalidInput

# Magic numbers of the formats we accept; everything else is refused before PIL sees it,
# so PIL never walks its whole plugin list over arbitrary bytes.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
)
_WEBP_PREFIX = (b"RIFF", b"WEBP")


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what a server will decode; all checked before pixel data is touched."""

    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 12_000
    max_boxes: int = 256

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.max_side <= 0:
            raise ValueError("image limits must be positive")


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int
    mode: str


def load_decoders() -> None:
    """Import PIL's format plugins now. PIL imports them on the first open (~8 ms for JPEG, more for
    WEBP, whose plugin only its full init() brings), which would land on a server's first request."""
    Image.init()


def sniff_format(data: bytes) -> str | None:
    """The format named by the leading magic bytes, or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == _WEBP_PREFIX[0] and data[8:12] == _WEBP_PREFIX[1]:
        return "WEBP"
    return None


def _as_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
        return data.tobytes()
    raise InvalidInput(f"image must be encoded bytes, got {type(data).__name__}")


def _check_size(data: bytes, limits: ImageLimits) -> str:
    if len(data) == 0:
        raise InvalidInput("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidInput(
            f"image is {len(data)} bytes, more than the limit of {limits.max_bytes} bytes"
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidInput(
            f"not a supported image (JPEG, PNG, WEBP, BMP): header bytes {data[:8].hex()}"
        )
    return fmt


def _open(data: bytes, fmt: str) -> Image.Image:
    """PIL's lazy open: parses the header only; pixel data is decoded later by load()."""
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit right after this; PIL's own warning is redundant.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise InvalidInput(
            f"{fmt} header claims too many pixels (decompression bomb?): {exc}"
        ) from None
    except UnidentifiedImageError:
        raise InvalidInput(f"corrupt or truncated {fmt} header: cannot be parsed") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"corrupt {fmt} header: {exc}") from None


def _check_dims(img: Image.Image, fmt: str, limits: ImageLimits) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"{fmt} header claims an empty image ({width}x{height})")
    if width * height > limits.max_pixels:
        raise InvalidInput(
            f"{fmt} image is {width}x{height} = {width * height} pixels, more than the "
            f"limit of {limits.max_pixels} (decompression bomb?)"
        )
    if width > limits.max_side or height > limits.max_side:
        raise InvalidInput(
            f"{fmt} image is {width}x{height}; a side exceeds the limit of {limits.max_side} px"
        )


def probe(
    data: bytes | bytearray | memoryview, limits: ImageLimits = DEFAULT_LIMITS
) -> ImageHeader:
    """Format and size from the header alone, with every limit applied; no pixel decoding."""
    raw = _as_bytes(data)
    fmt = _check_size(raw, limits)
    img = _open(raw, fmt)
    try:
        _check_dims(img, fmt, limits)
        return ImageHeader(fmt, img.size[0], img.size[1], img.mode)
    finally:
        img.close()


def decode_image(
    data: bytes | bytearray | memoryview, limits: ImageLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Encoded image → contiguous RGB uint8 array [H, W, 3], upright per its EXIF orientation.

    Raises InvalidInput naming the problem for empty, oversized, non-image, truncated or
    corrupt input, and for headers claiming more pixels than `limits` allows.
    """
    raw = _as_bytes(data)
    fmt = _check_size(raw, limits)
    img = _open(raw, fmt)
    try:
        _check_dims(img, fmt, limits)  # before load(): a bomb is refused unallocated
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidInput(f"truncated or corrupt {fmt} image: {exc}") from None
        img = _upright(img)
        return _to_rgb_array(img)
    finally:
        img.close()


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block leaves the image as stored."""
    try:
        rotated = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - bad EXIF metadata must not reject good pixels
        return img
    return rotated if rotated is not None else img


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: scale the 0..65535 range to 0..255 (convert("RGB") would clip).
        wide = np.asarray(img, dtype=np.int64 if mode == "I" else np.uint16).astype(np.float64)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":
        flt = np.nan_to_num(np.asarray(img, dtype=np.float64))
        gray = np.clip(np.rint(flt), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels shown on white, as a marketplace page would.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def clip_boxes(
    boxes: np.ndarray,
    width: int,
    height: int,
    *,
    min_side: float = 1.0,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Validate pixel boxes [n, 4] (x1, y1, x2, y2) against a width×height image.

    Partly-outside boxes are clipped to the image; boxes that are non-finite, inverted,
    degenerate (a side under `min_side` px after clipping) or wholly outside are rejected
    with InvalidInput naming the box.
    """
    arr = np.asarray(boxes)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise InvalidInput(f"boxes must have shape [n, 4], got {list(arr.shape)}")
    if arr.shape[0] > limits.max_boxes:
        raise InvalidInput(f"{arr.shape[0]} boxes, more than the limit of {limits.max_boxes}")
    if not np.issubdtype(arr.dtype, np.number):
        raise InvalidInput(f"boxes must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    out = np.empty_like(arr)
    for i, (x1, y1, x2, y2) in enumerate(arr.tolist()):
        if not all(np.isfinite(v) for v in (x1, y1, x2, y2)):
            raise InvalidInput(f"box {i} {[x1, y1, x2, y2]} has a non-finite coordinate")
        if x2 <= x1 or y2 <= y1:
            raise InvalidInput(
                f"box {i} {[x1, y1, x2, y2]} is degenerate or inverted (need x1<x2, y1<y2)"
            )
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if cx2 - cx1 < min_side or cy2 - cy1 < min_side:
            raise InvalidInput(
                f"box {i} {[x1, y1, x2, y2]} lies outside the {width}x{height} image "
                f"or is under {min_side:g} px once clipped"
            )
        out[i] = (cx1, cy1, cx2, cy2)
    return out
