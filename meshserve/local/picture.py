"""A contact sheet of searches: each query photo with its boxes, and per detection its top matches
(the item's listing photo, title, score and shard). Used by `search --show` and `demo`."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from meshserve.v1 import photo_search_pb2

log = logging.getLogger(__name__)

QUERY_SIDE = 320
THUMB = 96
ROW_GAP = 8
TEXT_H = 44
MATCHES_SHOWN = 5
BOX_COLOURS = ("#ff3b30", "#34c759", "#0a84ff", "#ff9f0a", "#bf5af2", "#64d2ff")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _listing_photo(item_id: str, home: Path | None) -> Image.Image | None:
    """The item's listing photo as the index holds it, or None when the catalogue is not here."""
    try:
        from meshserve.training.catalogue import get_item
        from meshserve.training.datasets import LISTING_CONFIG, REFERENCE_SEEDS
        from meshserve.training.render import render_photo

        item = get_item(int(item_id), home)
        photo = render_photo(item, REFERENCE_SEEDS + item.item_id, LISTING_CONFIG)
        return Image.fromarray(photo.image)
    except Exception as exc:  # noqa: BLE001 - a picture without thumbnails is still useful
        log.debug("no listing photo for %s: %s", item_id, exc)
        return None


def _title(item_id: str, attributes: dict[str, str]) -> str:
    title = attributes.get("title") or f"item {item_id}"
    return title if len(title) <= 22 else title[:21] + "…"


def _query_panel(image_bytes: bytes, response: photo_search_pb2.SearchResponse) -> Image.Image:
    query = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    scale = QUERY_SIDE / max(query.size)
    panel = query.resize((max(1, round(query.width * scale)), max(1, round(query.height * scale))))
    draw = ImageDraw.Draw(panel)
    font = _font(13)
    for n, detection in enumerate(response.detections):
        colour = BOX_COLOURS[n % len(BOX_COLOURS)]
        b = detection.box
        box = [b.x_min * scale, b.y_min * scale, b.x_max * scale, b.y_max * scale]
        draw.rectangle(box, outline=colour, width=3)
        label = f"{n + 1} {detection.label} {detection.score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), label, font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=colour)
        draw.text((box[0], box[1]), label, fill="white", font=font)
    return panel


def draw_results(
    searches: Sequence[tuple[bytes, photo_search_pb2.SearchResponse]],
    out_path: Path,
    home: Path | None = None,
) -> Path:
    """Write the contact sheet PNG for `searches` and return its path."""
    font, small = _font(14), _font(12)
    blocks = []
    for image_bytes, response in searches:
        panel = _query_panel(image_bytes, response)
        rows = max(1, len(response.detections))
        height = max(panel.height, rows * (THUMB + TEXT_H + ROW_GAP)) + 30
        width = QUERY_SIDE + 20 + MATCHES_SHOWN * (THUMB + 70)
        block = Image.new("RGB", (width, height), "white")
        block.paste(panel, (0, 30))
        draw = ImageDraw.Draw(block)
        coverage = response.coverage
        draw.text((4, 6), f"coverage {coverage.shards_answered}/{coverage.shards_expected}   "
                          f"versions {dict(response.versions)}", fill="black", font=font)  # fmt: skip
        if not response.detections:
            draw.text((QUERY_SIDE + 20, 40), "no detections", fill="gray", font=font)
        for n, detection in enumerate(response.detections):
            y = 30 + n * (THUMB + TEXT_H + ROW_GAP)
            colour = BOX_COLOURS[n % len(BOX_COLOURS)]
            draw.text((QUERY_SIDE + 6, y), str(n + 1), fill=colour, font=font)
            for m, match in enumerate(detection.matches[:MATCHES_SHOWN]):
                x = QUERY_SIDE + 20 + m * (THUMB + 70)
                thumb = _listing_photo(match.item_id, home)
                if thumb is not None:
                    block.paste(thumb.resize((THUMB, THUMB)), (x, y))
                else:
                    draw.rectangle([x, y, x + THUMB, y + THUMB], fill="#dddddd")
                draw.text((x, y + THUMB + 2), _title(match.item_id, dict(match.attributes)), fill="black", font=small)
                draw.text((x, y + THUMB + 16), f"{match.score:.3f} · shard {match.shard}", fill="#444444",
                          font=small)  # fmt: skip
                draw.text((x, y + THUMB + 30), f"item {match.item_id}", fill="#888888", font=small)
        blocks.append(block)
    sheet = Image.new("RGB", (max(b.width for b in blocks), sum(b.height + 10 for b in blocks)), "#f2f2f2")
    y = 0
    for block in blocks:
        sheet.paste(block, (0, y))
        y += block.height + 10
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path)
    return out_path
