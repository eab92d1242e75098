"""Shard build / verify / load: what gets served, and what is refused with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from meshserve.inference.shards import (
    HnswParams,
    ShardError,
    build_shard,
    load_shard,
    read_manifest,
)


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    vectors = unit_vectors(500, 32)
    build_shard(
        tmp_path / "s0",
        vectors,
        np.arange(1000, 1500),
        index="catalogue",
        shard="s0",
        embedder_version="emb-1",
        params=HnswParams(M=16, ef_construction=100, ef=50),
    )
    return tmp_path / "s0"


def test_every_vector_finds_itself_first(shard_dir: Path) -> None:
    shard = load_shard(shard_dir, expect_dim=32, expect_embedder_version="emb-1")
    queries = unit_vectors(500, 32)
    ids, scores = shard.search(queries, k=5)
    assert ids.shape == (500, 5) and ids.dtype == np.int64 and scores.dtype == np.float32
    assert (ids[:, 0] == np.arange(1000, 1500)).mean() >= 0.99
    assert np.allclose(scores[:, 0], 1.0, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 1e-6).all(), "scores must be ranked best first"


def test_manifest_carries_the_registry_meta(shard_dir: Path) -> None:
    meta = read_manifest(shard_dir).registry_meta()
    assert meta == {
        "index": "catalogue",
        "shard": "s0",
        "embedder_version": "emb-1",
        "dim": "32",
        "count": "500",
        "metric": "ip",
        "generation": "1",
    }


def test_k_larger_than_the_shard_gives_fewer_results(tmp_path: Path) -> None:
    build_shard(tmp_path, unit_vectors(3, 8), [7, 8, 9], index="i", shard="x",
                embedder_version="v")
    ids, scores = load_shard(tmp_path).search(unit_vectors(2, 8, seed=1), k=50)
    assert ids.shape == (2, 3) and scores.shape == (2, 3)
    assert sorted(ids[0]) == [7, 8, 9]


def test_corrupt_index_is_refused(shard_dir: Path) -> None:
    data = bytearray((shard_dir / "index.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (shard_dir / "index.bin").write_bytes(bytes(data))
    with pytest.raises(ShardError, match="checksum mismatch"):
        load_shard(shard_dir)


def test_truncated_index_is_refused(shard_dir: Path) -> None:
    data = (shard_dir / "index.bin").read_bytes()
    (shard_dir / "index.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(ShardError, match="checksum mismatch"):
        load_shard(shard_dir)


def test_missing_manifest_means_unfinished_build(shard_dir: Path) -> None:
    (shard_dir / "manifest.json").unlink()
    with pytest.raises(ShardError, match="build did not finish"):
        load_shard(shard_dir)


def test_mismatched_expectations_are_refused(shard_dir: Path) -> None:
    with pytest.raises(ShardError, match="dim 32 does not match expected 64"):
        load_shard(shard_dir, expect_dim=64)
    with pytest.raises(ShardError, match="embedder version 'emb-1' does not match"):
        load_shard(shard_dir, expect_embedder_version="emb-2")


def test_manifest_lying_about_count_is_refused(shard_dir: Path) -> None:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["count"] = 400
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="id map holds 500 ids, manifest says 400"):
        load_shard(shard_dir)


def test_bad_vectors_are_refused_at_build(tmp_path: Path) -> None:
    vectors = unit_vectors(4, 8)
    vectors[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        build_shard(tmp_path, vectors, [1, 2, 3, 4], index="i", shard="x", embedder_version="v")
    with pytest.raises(ValueError, match="3 item ids for 4 vectors"):
        build_shard(tmp_path, unit_vectors(4, 8), [1, 2, 3], index="i", shard="x",
                    embedder_version="v")
