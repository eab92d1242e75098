"""The `indexer` kind: read-only index shards answering nearest-neighbour queries.

Predict(queries f32 [N, D], k) → item_ids i64 [N, k'], scores f32 [N, k'] with k' = min(k, count),
best first. A query made by another embedder version than the shard's is refused
(FAILED_PRECONDITION): vectors of different embedder versions never meet. One process may serve
several shards of an index (`--shard` repeated, a ShardGroup): it registers once per shard, and a
call names the shards it searches (PredictRequest.shards), each answered on its own.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from meshserve.errors import FailedPrecondition, InvalidInput, NotFound
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

    @property
    def shard_id(self) -> str:
        return self.shard.manifest.shard

    def shard_meta(self) -> dict[str, dict[str, str]]:
        return {self.shard_id: {"model": self.name, "version": self.version, "role": self.role, **self.meta()}}

    def search_shard(self, shard: str, inputs: Arrays, params: Params) -> Arrays:
        if shard != self.shard_id:
            raise NotFound(f"shards: shard {shard!r} is not served here (this serves {self.shard_id!r})")
        self.check(inputs, params)
        return self.predict(inputs, params)


class ShardGroup(Model):
    """Several shards of one index in one process. A call names the shards it searches; a call
    that names none is refused, as it could mean any of them."""

    role = "indexer"

    def __init__(self, members: Sequence[IndexerModel]):
        ids = [m.shard_id for m in members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"--shard: the same shard id twice in {ids}")
        if len({(m.name, m.shard.manifest.dim) for m in members}) != 1:
            raise ValueError("--shard: shards served by one process must be of one index and one dim, got "
                             + ", ".join(f"{m.shard_id} ({m.name}, dim {m.shard.manifest.dim})" for m in members))
        self.members = {m.shard_id: m for m in members}
        self.released: dict[str, str] = {}  # shard → why it is no longer served here
        self.name = members[0].name
        self.version = "+".join(sorted({m.version for m in members}))
        self.signature = members[0].signature
        self.runs_inline = all(m.runs_inline for m in members)
        first = members[0].shard.manifest
        self._index_meta = {"index": first.index, "dim": str(first.dim)}

    def load(self) -> None:
        """Every shard was verified and loaded in build()."""

    def warmup(self) -> None:
        for member in self.members.values():
            member.warmup()

    def check(self, inputs: Arrays, params: Params) -> None:
        raise FailedPrecondition(f"this indexer serves shards {', '.join(self.members)}: name the ones to "
                                 "search in PredictRequest.shards")  # fmt: skip

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        self.check(inputs, params)
        return {}

    def meta(self) -> dict[str, str]:
        return {**self._index_meta, "shards": ",".join(self.members)}

    def shard_meta(self) -> dict[str, dict[str, str]]:
        return {shard: meta for m in self.members.values() for shard, meta in m.shard_meta().items()}

    def search_shard(self, shard: str, inputs: Arrays, params: Params) -> Arrays:
        member = self.members.get(shard)
        if member is None:
            if shard in self.released:
                raise NotFound(f"shards: shard {shard!r} is no longer served here: {self.released[shard]}")
            raise NotFound(f"shards: shard {shard!r} is not served here (this serves {', '.join(self.members)})")
        return member.search_shard(shard, inputs, params)

    def release_shard(self, shard: str, reason: str) -> bool:
        """Drop the shard's index (a search already running on it finishes with its own reference)."""
        if self.members.pop(shard, None) is None:
            return False
        self.released[shard] = reason
        if self.members:
            self.version = "+".join(sorted({m.version for m in self.members.values()}))
        return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", type=Path, required=True, action="append",
                        help="shard directory made by `meshserve shard build` (verified before serving); "
                        "repeat it to serve several shards of one index in this process (one registration each)")
    parser.add_argument("--max-queries", type=int, default=MAX_QUERIES,
                        help=f"largest number of query vectors in one request (default {MAX_QUERIES})")  # fmt: skip


def build(args: argparse.Namespace) -> Model:
    members = []
    for path in args.shard:
        try:
            shard = load_shard(path)
        except ShardError as exc:
            raise ValueError(f"refusing to serve shard: {exc}") from exc
        members.append(IndexerModel(shard, max_queries=args.max_queries))
    return members[0] if len(members) == 1 else ShardGroup(members)
