"""Index shards on disk: build an hnswlib index over one catalogue slice, verify and load it read-only."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import hnswlib
import numpy as np

INDEX_FILE = "index.bin"
IDS_FILE = "ids.npy"  # int64 catalogue item ids, row i = hnswlib label i
MANIFEST_FILE = "manifest.json"  # written last: a directory without it is an unfinished build
METRICS = ("ip", "cosine", "l2")


class ShardError(Exception):
    """A shard directory that must not be served: missing, corrupt, truncated or mismatched."""


@dataclass(frozen=True)
class HnswParams:
    """Build and search parameters. hnswlib's `ef` is index-wide: set once at load, never per request."""

    M: int = 16
    ef_construction: int = 200
    ef: int = 64

    def __post_init__(self) -> None:
        if not 2 <= self.M <= 100:
            raise ValueError(f"M must be in [2, 100], got {self.M}")
        if self.ef_construction < self.M or self.ef < 1:
            raise ValueError("ef_construction must be ≥ M and ef ≥ 1")


DEFAULT_PARAMS = HnswParams()


@dataclass(frozen=True)
class ShardManifest:
    """What a shard is; its fields become the indexer's registry meta (docs/architecture.md)."""

    index: str  # e.g. "catalogue"
    shard: str  # shard id, unique within the index
    embedder_version: str
    dim: int
    metric: str
    count: int
    M: int
    ef_construction: int
    ef: int
    checksum: str  # sha256 over the index file and the id map
    generation: int  # grows with every build of the index (pipeline run)
    created_at: float
    items: str = ""  # which slice of the catalogue, for people

    def registry_meta(self) -> dict[str, str]:
        return {
            "index": self.index,
            "shard": self.shard,
            "embedder_version": self.embedder_version,
            "dim": str(self.dim),
            "count": str(self.count),
            "metric": self.metric,
            "generation": str(self.generation),
        }

    @classmethod
    def from_json(cls, text: str) -> ShardManifest:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        missing = known - set(raw) - {"items"}
        if missing:
            raise ShardError(f"manifest lacks fields {sorted(missing)}")
        return cls(**{k: v for k, v in raw.items() if k in known})


def _checksum(index_path: Path, ids_path: Path) -> str:
    digest = hashlib.sha256()
    for path in (index_path, ids_path):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def build_shard(
    out_dir: Path,
    vectors: np.ndarray,
    item_ids: np.ndarray | list[int],
    *,
    index: str,
    shard: str,
    embedder_version: str,
    metric: str = "ip",
    params: HnswParams = DEFAULT_PARAMS,
    generation: int = 1,
    items: str = "",
    num_threads: int = 1,
) -> ShardManifest:
    """Write index, id map and (last) manifest into `out_dir`; return the manifest."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty [N, D] array, got shape {vectors.shape}")
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if item_ids.shape != (vectors.shape[0],):
        raise ValueError(f"{len(item_ids)} item ids for {vectors.shape[0]} vectors")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or inf")
    count, dim = vectors.shape

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    hnsw = hnswlib.Index(space=metric, dim=dim)
    hnsw.init_index(max_elements=count, M=params.M, ef_construction=params.ef_construction)
    hnsw.add_items(vectors, np.arange(count), num_threads=num_threads)
    index_path, ids_path = out_dir / INDEX_FILE, out_dir / IDS_FILE
    hnsw.save_index(str(index_path))
    with open(ids_path, "wb") as fh:
        np.save(fh, item_ids, allow_pickle=False)

    manifest = ShardManifest(
        index=index,
        shard=shard,
        embedder_version=embedder_version,
        dim=dim,
        metric=metric,
        count=count,
        M=params.M,
        ef_construction=params.ef_construction,
        ef=params.ef,
        checksum=_checksum(index_path, ids_path),
        generation=generation,
        created_at=time.time(),
        items=items,
    )
    tmp = out_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(manifest), indent=2))
    os.replace(tmp, out_dir / MANIFEST_FILE)
    return manifest


def read_manifest(shard_dir: Path) -> ShardManifest:
    path = shard_dir / MANIFEST_FILE
    if not path.is_file():
        raise ShardError(f"{shard_dir}: no {MANIFEST_FILE} (not a shard, or its build did not finish)")
    try:
        return ShardManifest.from_json(path.read_text())
    except (ValueError, TypeError) as exc:
        raise ShardError(f"{path}: unreadable manifest: {exc}") from exc


class LoadedShard:
    """A verified, read-only shard: search only, never add (hnswlib is unsafe for add + search)."""

    def __init__(self, manifest: ShardManifest, hnsw: hnswlib.Index, item_ids: np.ndarray):
        self.manifest = manifest
        self._hnsw = hnsw
        self.item_ids = item_ids

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest neighbours: (item ids i64 [N, k'], scores f32 [N, k']) with k' = min(k, count).

        Scores grow with similarity: inner product for ip/cosine, negative squared distance for l2.
        """
        k_eff = min(k, self.manifest.count)
        labels, distances = self._hnsw.knn_query(queries, k=k_eff, num_threads=1)
        if self.manifest.metric == "l2":
            scores = -distances
        else:
            scores = 1.0 - distances
        return self.item_ids[labels.astype(np.int64)], scores.astype(np.float32)


def load_shard(
    shard_dir: Path, *, expect_dim: int | None = None, expect_embedder_version: str | None = None
) -> LoadedShard:
    """Verify checksum, sizes and expectations, then load. Raises ShardError saying what is wrong."""
    manifest = read_manifest(shard_dir)
    index_path, ids_path = shard_dir / INDEX_FILE, shard_dir / IDS_FILE
    for path in (index_path, ids_path):
        if not path.is_file():
            raise ShardError(f"{shard_dir}: {path.name} is missing")
    actual = _checksum(index_path, ids_path)
    if actual != manifest.checksum:
        raise ShardError(
            f"{shard_dir}: checksum mismatch (manifest {manifest.checksum[:12]}…, "
            f"files {actual[:12]}…): corrupt or truncated shard"
        )
    if expect_dim is not None and manifest.dim != expect_dim:
        raise ShardError(f"{shard_dir}: dim {manifest.dim} does not match expected {expect_dim}")
    if expect_embedder_version is not None and manifest.embedder_version != expect_embedder_version:
        raise ShardError(
            f"{shard_dir}: embedder version {manifest.embedder_version!r} does not match "
            f"expected {expect_embedder_version!r}"
        )
    if manifest.metric not in METRICS:
        raise ShardError(f"{shard_dir}: unknown metric {manifest.metric!r}")
    try:
        item_ids = np.load(ids_path, allow_pickle=False)
    except ValueError as exc:
        raise ShardError(f"{shard_dir}: unreadable id map: {exc}") from exc
    if item_ids.dtype != np.int64 or item_ids.shape != (manifest.count,):
        raise ShardError(f"{shard_dir}: id map holds {len(item_ids)} ids, manifest says {manifest.count}")

    hnsw = hnswlib.Index(space=manifest.metric, dim=manifest.dim)
    try:
        hnsw.load_index(str(index_path), max_elements=manifest.count)
    except RuntimeError as exc:
        raise ShardError(f"{shard_dir}: hnswlib cannot load the index: {exc}") from exc
    if hnsw.get_current_count() != manifest.count:
        raise ShardError(
            f"{shard_dir}: index holds {hnsw.get_current_count()} vectors, manifest says {manifest.count}"
        )
    hnsw.set_ef(max(manifest.ef, 1))
    return LoadedShard(manifest, hnsw, item_ids)
