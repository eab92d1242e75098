"""The `indexer` kind: one read-only index shard answering nearest-neighbour queries.

Predict(queries f32 [N, D], k) → item_ids i64 [N, k'], scores f32 [N, k'] with k' = min(k, count),
best first. A query made by another embedder version than the shard's is refused
(FAILED_PRECONDITION): vectors of different embedder versions never meet.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from meshserve.errors import FailedPrecondition, InvalidInput
from meshserve.inference.shards import LoadedShard, ShardError, load_shard
from meshserve.servers.model import Model
from meshserve.wire.signature import Arrays, Params
from meshserve.wire.signatures import MAX_QUERIES, indexer_signature

# A shard up to this many items answers a whole request in well under a millisecond (HNSW, one
# thread: ~0.1 ms for 4 queries over 500 items), less than the hop to a model thread and back
# costs, so it answers on the event loop (Model.runs_inline). Larger shards use the model thread.
INLINE_MAX_ITEMS = 20_000


class IndexerModel(Model):
    role = "indexer"

    def __init__(self, shard: LoadedShard, max_queries: int = MAX_QUERIES):
        manifest = shard.manifest
        self.shard = shard
        self.name = manifest.index
        self.version = f"{manifest.embedder_version}.g{manifest.generation}"
        self.signature = indexer_signature(manifest.dim, max_queries)
        self.runs_inline = manifest.count <= INLINE_MAX_ITEMS

    def load(self) -> None:
        """The shard was verified and loaded in build(); nothing is left to do."""

    def warmup(self) -> None:
        self.shard.search(np.zeros((1, self.shard.manifest.dim), dtype=np.float32), 1)

    def check(self, inputs: Arrays, params: Params) -> None:
        wanted = params["embedder_version"]
        have = self.shard.manifest.embedder_version
        if wanted and wanted != have:
            raise FailedPrecondition(
                f"parameters['embedder_version']: queries from embedder {wanted!r} cannot search "
                f"shard {self.shard.manifest.shard!r}, built with embedder {have!r}"
            )
        queries = inputs["queries"]
        assert isinstance(queries, np.ndarray)
        if not np.isfinite(queries).all():
            raise InvalidInput("inputs['queries']: contains NaN or inf")

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        queries = inputs["queries"]
        assert isinstance(queries, np.ndarray)
        item_ids, scores = self.shard.search(queries, int(params["k"]))
        return {"item_ids": item_ids, "scores": scores}

    def meta(self) -> dict[str, str]:
        return self.shard.manifest.registry_meta()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", type=Path, required=True,
                        help="shard directory made by `meshserve shard build` (verified before serving)")
    parser.add_argument("--max-queries", type=int, default=MAX_QUERIES,
                        help=f"largest number of query vectors in one request (default {MAX_QUERIES})")  # fmt: skip


def build(args: argparse.Namespace) -> Model:
    try:
        shard = load_shard(args.shard)
    except ShardError as exc:
        raise ValueError(f"refusing to serve shard: {exc}") from exc
    return IndexerModel(shard, max_queries=args.max_queries)
