"""Sharded ANN search vs one index: recall of the merged top-k, per-shard ef, latency, build cost.

Run:  python bench/shards.py                      # clustered vectors, 20,000 x 128, S = 1, 4, 8
      python bench/shards.py --catalogue          # the catalogue's listing photos, held-out query photos
      python bench/shards.py --vectors emb.npy    # your own embeddings
      python bench/shards.py --synthetic 1000000  # build time and memory per shard, 8 shards

Recall is measured against exact (brute-force) search over the same items; the
single-index figure is the baseline every sharded figure is set against.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from meshserve.inference.shards import HnswParams, build_shard, load_shard

K = 10


def clustered_vectors(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres: closer to real embeddings than uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    assignment = rng.integers(0, clusters, size=n)
    vectors = centres[assignment] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ base.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def build_shards(base: np.ndarray, shards: int, params: HnswParams, root: Path) -> list:
    """Split `base` into `shards` disjoint contiguous slices; global row numbers are the item ids."""
    loaded = []
    for s, rows in enumerate(np.array_split(np.arange(len(base)), shards)):
        shard_dir = root / f"S{shards}-{s}"
        build_shard(shard_dir, base[rows], rows, index="bench", shard=str(s),
                    embedder_version="bench", params=params, num_threads=os.cpu_count() or 1)
        loaded.append(load_shard(shard_dir))
    return loaded


def merged_search(shards: list, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """Each shard's top-k, merged by score into one top-k; plus each shard's per-query latency."""
    all_ids, all_scores, latencies = [], [], []
    for shard in shards:
        start = time.perf_counter()
        ids, scores = shard.search(queries, k)
        latencies.append((time.perf_counter() - start) / len(queries))
        all_ids.append(ids)
        all_scores.append(scores)
    ids, scores = np.concatenate(all_ids, axis=1), np.concatenate(all_scores, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), latencies


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def with_ef(shards: list, ef: int) -> None:
    for shard in shards:
        shard._hnsw.set_ef(ef)  # bench only: servers never change ef after load


def recall_table(base: np.ndarray, queries: np.ndarray, params: HnswParams) -> None:
    truth = exact_top_k(base, queries, K)
    print(f"items {len(base):,}  dim {base.shape[1]}  queries {len(queries):,}  "
          f"M {params.M}  ef_construction {params.ef_construction}  ef {params.ef}  k {K}")
    print(f"{'shards':>6} {'recall@10':>10} {'vs 1 index':>10} {'µs/query/shard':>15} "
          f"{'ef for ≥0.98':>13}")
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        for count in (1, 4, 8):
            shards = build_shards(base, count, params, Path(tmp))
            found, latencies = merged_search(shards, queries, K)
            value = recall(found, truth)
            baseline = baseline if baseline is not None else value
            needed = "-"
            for ef in (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512):
                with_ef(shards, ef)
                if recall(merged_search(shards, queries, K)[0], truth) >= 0.98:
                    needed = str(ef)
                    break
            with_ef(shards, params.ef)
            print(f"{count:>6} {value:>10.4f} {value / baseline:>10.3f} "
                  f"{1e6 * float(np.median(latencies)):>15.1f} {needed:>13}")


def build_cost(n: int, dim: int, shards: int, params: HnswParams) -> None:
    base = clustered_vectors(n, dim, clusters=max(16, n // 1000), seed=3)
    print(f"synthetic build: {n:,} x {dim} over {shards} shards, M {params.M}, "
          f"ef_construction {params.ef_construction}, threads {os.cpu_count()}")
    print(f"{'shard':>5} {'vectors':>9} {'build s':>8} {'file MiB':>9} {'RSS +MiB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for s, rows in enumerate(np.array_split(np.arange(n), shards)):
            before = rss_bytes()
            start = time.perf_counter()
            shard_dir = Path(tmp) / str(s)
            build_shard(shard_dir, base[rows], rows, index="bench", shard=str(s),
                        embedder_version="bench", params=params, num_threads=os.cpu_count() or 1)
            seconds = time.perf_counter() - start
            loaded = load_shard(shard_dir)
            grown = rss_bytes() - before
            size = (shard_dir / "index.bin").stat().st_size
            print(f"{s:>5} {len(rows):>9,} {seconds:>8.2f} {size / 2**20:>9.1f} {grown / 2**20:>9.1f}")
            del loaded


def catalogue_vectors(n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Listing-photo vectors of every item (what shards hold) and held-out query-photo vectors."""
    from meshserve.inference.artifacts import latest
    from meshserve.inference.embedder import Embedder
    from meshserve.training.catalogue import load_items
    from meshserve.training.evaluate import eval_photos, query_crops
    from meshserve.training.shard_build import embed_listings

    embedder_dir = latest("embedder")
    if embedder_dir is None:
        raise SystemExit("no embedder artifact: run `meshserve train --quick` first")
    items = load_items()
    base, _ = embed_listings(items, embedder_dir)
    embedder = Embedder.load(embedder_dir)
    crops, _ = query_crops(eval_photos(items, n_queries), embedder.cfg.crop_size)
    return base, embedder.embed_crops(crops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000, help="clustered vectors for the recall table")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--vectors", type=Path, help=".npy of L2-normalised [N, D] vectors to use instead")
    parser.add_argument("--catalogue", action="store_true",
                        help="index the catalogue's listing photos with the newest embedder and query with "
                        "held-out photos (MESHSERVE_HOME must hold a trained embedder)")
    parser.add_argument("--synthetic", type=int, metavar="N", help="report build time/memory for N vectors")
    parser.add_argument("--M", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef", type=int, default=32)
    args = parser.parse_args()
    params = HnswParams(M=args.M, ef_construction=args.ef_construction, ef=args.ef)

    if args.synthetic:
        build_cost(args.synthetic, 128, 8, params)
        return
    if args.catalogue:
        base, queries = catalogue_vectors(args.queries)
        recall_table(base, queries, params)
        return
    if args.vectors:
        vectors = np.load(args.vectors).astype(np.float32)
    else:
        vectors = clustered_vectors(args.items + args.queries, 128, clusters=200, seed=1)
    rng = np.random.default_rng(2)
    picked = rng.permutation(len(vectors))
    queries, base = vectors[picked[: args.queries]], vectors[picked[args.queries:]]
    recall_table(base, queries, params)


if __name__ == "__main__":
    main()
