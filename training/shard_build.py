"""Building a shard from the catalogue: one listing photo per item of a slice, embedded by one
embedder artifact, into an hnswlib index (meshserve/inference/shards.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshserve.errors import InvalidInput
from meshserve.inference.artifacts import resolve_model_dir
from meshserve.inference.shards import DEFAULT_PARAMS, HnswParams, ShardManifest, build_shard
from meshserve.training.catalogue import Item, load_items


@dataclass(frozen=True)
class ItemSlice:
    """Which items a shard holds: all, an id range or a listing-time range (half-open)."""

    kind: str  # all | ids | time
    lo: int = 0
    hi: int = 0

    def describe(self) -> str:
        return "all items" if self.kind == "all" else f"{self.kind} [{self.lo}, {self.hi})"

    def items(self, home: Path | None = None) -> list[Item]:
        if self.kind == "ids":
            return load_items(home, id_range=(self.lo, self.hi))
        if self.kind == "time":
            return load_items(home, time_range=(self.lo, self.hi))
        return load_items(home)


def parse_slice(text: str) -> ItemSlice:
    """`all`, `ids:LO-HI` or `time:START-END` (unix seconds); HI/END exclusive."""
    if text == "all":
        return ItemSlice("all")
    kind, _, bounds = text.partition(":")
    lo_text, _, hi_text = bounds.partition("-")
    if kind not in ("ids", "time") or not lo_text.isdigit() or not hi_text.isdigit():
        raise ValueError(f"--items {text!r}: expected all, ids:LO-HI or time:START-END")
    lo, hi = int(lo_text), int(hi_text)
    if hi <= lo:
        raise ValueError(f"--items {text!r}: the range is empty (HI must exceed LO)")
    return ItemSlice(kind, lo, hi)


def embed_listings(items: list[Item], embedder_dir: Path) -> tuple[np.ndarray, str]:
    """Unit vectors [n, D] of each item's listing photo, and the embedder version that made them."""
    from meshserve.inference.embedder import Embedder
    from meshserve.training.evaluate import reference_crops

    embedder = Embedder.load(embedder_dir)
    crops, crop_ids = reference_crops(items, embedder.cfg.crop_size)
    if not np.array_equal(crop_ids, [item.item_id for item in items]):
        raise RuntimeError("reference photos came back out of order")
    return embedder.embed_crops(crops), embedder.version


def build_from_catalogue(
    out_dir: Path,
    item_slice: ItemSlice,
    *,
    embedder: str | None = None,
    index: str = "catalogue",
    shard: str,
    generation: int = 1,
    params: HnswParams = DEFAULT_PARAMS,
    home: Path | None = None,
) -> ShardManifest:
    items = item_slice.items(home)
    if not items:
        raise InvalidInput(f"the catalogue has no items in {item_slice.describe()}")
    embedder_dir = resolve_model_dir("embedder", embedder, home)
    vectors, version = embed_listings(items, embedder_dir)
    return build_shard(
        out_dir, vectors, [item.item_id for item in items], index=index, shard=shard,
        embedder_version=version, params=params, generation=generation, items=item_slice.describe(),
    )  # fmt: skip
