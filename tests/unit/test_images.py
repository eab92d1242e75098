"""Safe image decoding: every bad-input case from issue #4, each built here with PIL or bytes."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

from meshserve.errors import InvalidInput
from meshserve.wire.images import ImageLimits, clip_boxes, decode_image, probe


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def handmade_png(width: int, height: int, depth: int, color_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def png_bomb(side: int = 30000) -> bytes:
    """A valid-looking PNG whose header claims side×side RGB with a few bytes of pixel data."""
    return handmade_png(side, side, 8, 2, zlib.compress(b"\x00" * 1000))


def jpeg_bomb(side: int = 30000) -> bytes:
    """A real small JPEG with its SOF frame header rewritten to claim side×side."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (10, 200, 30)), "JPEG"))
    i = 2
    while i < len(data):
        assert data[i] == 0xFF
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            # SOF: length(2) precision(1) height(2) width(2)
            data[i + 5 : i + 9] = struct.pack(">HH", side, side)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker found")


def test_zero_bytes_refused() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("junk", [b"hello, this is not an image", bytes(range(256)) * 4])
def test_non_image_bytes_refused(junk: bytes) -> None:
    with pytest.raises(InvalidInput, match="not a supported image"):
        decode_image(junk)


def test_non_bytes_refused() -> None:
    with pytest.raises(InvalidInput, match="encoded bytes"):
        decode_image("a string")  # type: ignore[arg-type]


def test_too_many_encoded_bytes_refused() -> None:
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(InvalidInput, match="more than the limit"):
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))


def test_truncated_jpeg_refused() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    data = encode(noisy, "JPEG", quality=90)
    assert decode_image(data).shape == (128, 128, 3)
    for cut in (len(data) // 2, 200, 40):
        with pytest.raises(InvalidInput, match="JPEG"):
            decode_image(data[:cut])


def test_corrupt_and_truncated_png_refused() -> None:
    bad = handmade_png(8, 8, 8, 2, b"this is not deflate data")
    with pytest.raises(InvalidInput, match="PNG"):
        decode_image(bad)
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    for cut in (len(data) // 2, 60, 30):
        with pytest.raises(InvalidInput, match="PNG") as err:
            decode_image(data[:cut])
        assert "BytesIO" not in str(err.value)


def test_short_but_well_formed_png_is_sane() -> None:
    # A zlib stream that ends early inside a complete file: PIL fills the rest with zeros.
    short = handmade_png(8, 8, 8, 2, zlib.compress(b"\x00" + b"\x10" * 24))
    arr = decode_image(short)
    assert arr.shape == (8, 8, 3) and arr[0, 0, 0] == 16 and arr[7, 7, 0] == 0


@pytest.mark.parametrize("make", [png_bomb, jpeg_bomb], ids=["png", "jpeg"])
def test_decompression_bomb_refused_from_header(make) -> None:  # type: ignore[no-untyped-def]
    data = make()
    assert len(data) < 10_000
    with pytest.raises(InvalidInput, match="pixels"):
        probe(data)
    with pytest.raises(InvalidInput, match="pixels"):
        decode_image(data)
    # Below PIL's own bomb threshold, our limit names the claimed size.
    with pytest.raises(InvalidInput, match="9000x9000 = 81000000 pixels"):
        decode_image(make(9000))


def test_bomb_refused_without_allocating() -> None:
    """Under a 1.5 GB address-space cap a 30000² RGB buffer (2.7 GB) cannot exist.

    The child first shows the cap bites (decoding with the limit lifted fails on memory),
    then that the default limits refuse the same bytes with InvalidInput.
    """
    script = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1500 * 2**20, 1500 * 2**20))
        from PIL import Image
        from meshserve.errors import InvalidInput
        from meshserve.wire.images import ImageLimits, decode_image
        from tests.unit.test_images import png_bomb
        data = png_bomb()
        Image.MAX_IMAGE_PIXELS = None
        lifted = ImageLimits(max_pixels=10**10, max_side=10**6)
        try:
            decode_image(data, lifted)
            print("CONTROL-DECODED")
        except MemoryError:
            print("CONTROL-MEMORY")
        except InvalidInput as exc:
            print("CONTROL-INVALID", exc)
        try:
            decode_image(data)
        except InvalidInput as exc:
            print("REFUSED", exc)
        """
    )
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    import os

    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert out.returncode == 0, out.stderr
    assert "CONTROL-MEMORY" in out.stdout, out.stdout + out.stderr
    assert "REFUSED" in out.stdout and "pixels" in out.stdout, out.stdout


def test_long_thin_image_refused_by_side_limit() -> None:
    data = handmade_png(50_000, 1, 8, 0, zlib.compress(b"\x00" + b"\x80" * 50_000))
    with pytest.raises(InvalidInput, match="side"):
        decode_image(data)


def test_one_by_one() -> None:
    arr = decode_image(encode(Image.new("RGB", (1, 1), (12, 34, 56)), "PNG"))
    assert arr.shape == (1, 1, 3) and arr.dtype == np.uint8
    assert arr[0, 0].tolist() == [12, 34, 56]


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1)))
    arr = decode_image(encode(gray, "PNG"))
    assert arr.shape == (32, 64, 3)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    assert arr[0, 10, 0] == 40
    jpeg = decode_image(encode(gray, "JPEG", quality=95))
    assert jpeg.shape == (32, 64, 3)


def test_rgba_transparency_on_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue
    arr = decode_image(encode(rgba, "PNG"))
    assert arr.shape == (10, 10, 3)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[5, 5].tolist() == [255, 0, 0]


def test_palette_with_transparency() -> None:
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    arr = decode_image(encode(pal, "PNG", transparency=0))
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[3, 3].tolist() == [0, 200, 0]


def test_cmyk_jpeg_to_rgb() -> None:
    red = Image.new("RGB", (32, 32), (220, 20, 20)).convert("CMYK")
    data = encode(red, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    arr = decode_image(data)
    assert arr.shape == (32, 32, 3)
    r, g, b = arr[16, 16].tolist()
    assert r > 180 and g < 70 and b < 70, (r, g, b)


def test_exif_orientation_applied() -> None:
    # Stored 40 wide × 20 high: left half red, right half blue.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    arr = decode_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert arr.shape == (40, 20, 3)  # upright: 20 wide, 40 high
    top, bottom = arr[5, 10].tolist(), arr[35, 10].tolist()
    assert top[0] > 200 and top[2] < 60, top  # stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_sixteen_bit_grayscale_png_scaled_not_clipped() -> None:
    wide = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 256).astype(np.uint16)
    data = encode(Image.fromarray(wide), "PNG")
    arr = decode_image(data)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    # 65280 / 257 ≈ 254: the range is scaled, not clipped to white.
    assert arr[0, 0, 0] == 0 and 250 <= arr[15, 15, 0] <= 255
    assert 100 <= arr[8, 0, 0] <= 150


def test_sixteen_bit_rgb_png() -> None:
    h = w = 8
    px = (np.arange(h * w * 3).reshape(h, w, 3) * 300).astype(">u2")
    rows = b"".join(b"\x00" + px[y].tobytes() for y in range(h))
    arr = decode_image(handmade_png(w, h, 16, 2, zlib.compress(rows)))
    assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8
    expected = (px.astype(np.uint32) >> 8).astype(np.uint8)
    assert np.abs(arr.astype(int) - expected.astype(int)).max() <= 1


def test_webp_and_bmp_decode() -> None:
    img = Image.new("RGB", (20, 10), (0, 128, 255))
    for fmt in ("WEBP", "BMP"):
        arr = decode_image(encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
        assert arr.shape == (10, 20, 3)
        assert arr[5, 5].tolist() == [0, 128, 255]


def test_probe_reads_header_only() -> None:
    data = encode(Image.new("RGB", (300, 200)), "JPEG")
    head = probe(data)
    assert (head.format, head.width, head.height) == ("JPEG", 300, 200)


def test_boxes_partly_outside_are_clipped() -> None:
    out = clip_boxes(np.array([[-10, -5, 50, 40], [90, 90, 200, 300]], np.float32), 100, 100)
    assert out.dtype == np.float32
    assert out.tolist() == [[0, 0, 50, 40], [90, 90, 100, 100]]


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([200, 200, 300, 300], "outside"),
        ([-50, 10, -1, 20], "outside"),
        ([10, 10, 10, 40], "degenerate"),
        ([30, 10, 20, 40], "degenerate"),
        ([10, float("nan"), 20, 30], "non-finite"),
        ([10, 10, float("inf"), 30], "non-finite"),
        ([10, 10, 10.5, 30], "under 1 px"),
    ],
)
def test_bad_boxes_rejected(box: list[float], message: str) -> None:
    boxes = np.array([[0, 0, 5, 5], box], np.float32)
    with pytest.raises(InvalidInput, match=message) as err:
        clip_boxes(boxes, 100, 100)
    assert "box 1" in str(err.value)


def test_box_array_shape_and_count_checked() -> None:
    with pytest.raises(InvalidInput, match=r"shape \[n, 4\]"):
        clip_boxes(np.zeros((3, 5), np.float32), 10, 10)
    with pytest.raises(InvalidInput, match="limit"):
        clip_boxes(np.tile([[0, 0, 5, 5]], (300, 1)).astype(np.float32), 10, 10)
    assert clip_boxes(np.zeros((0, 4), np.float32), 10, 10).shape == (0, 4)
