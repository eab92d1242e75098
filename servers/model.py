"""The model contract every model kind implements: signature, load once, predict on a batch.

A model knows nothing of gRPC or protobuf. It sees numpy arrays (numeric inputs) and lists of
`bytes` (BYTES inputs), always batched along the first dimension, and returns the same kinds.

    class Doubler(Model):
        name, version, role = "doubler", "1", "identity"
        signature = Signature(
            inputs=(TensorSpec("x", "float32", (-1, 4), max_shape=(64, 4)),),
            outputs=(TensorSpec("y", "float32", (-1, 4)),),
        )
        def load(self) -> None: ...
        def predict(self, inputs, params): return {"y": inputs["x"] * 2}

The runtime validates every request against `signature` before the model sees it, merges
concurrent requests with `batch()` (compatible requests only, see `batch_key()`), runs
`predict()` in a worker thread (on the event loop only if `runs_inline`), and splits the result
back with `unbatch()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from meshserve.wire.signature import Arrays, Params, Signature


class Model(ABC):
    """Base class of every model kind. Subclasses set the class attributes and two methods."""

    name: str
    version: str
    role: str  # detector, embedder, indexer, classifier, shipping, identity …
    signature: Signature

    @abstractmethod
    def load(self) -> None:
        """Load weights / indexes once, before any request. May be slow; runs off the loop."""

    def warmup(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Run a representative call so the first request is not slow. Health stays
        NOT_SERVING until this returns."""

    @abstractmethod
    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        """Run on a validated batch: every input has the same first dimension N, every output
        must have first dimension N too (or override `unbatch`). Runs in a worker thread."""

    # check() runs on the event loop unless this is True; then it runs in a worker thread (for
    # per-request work that costs milliseconds, such as decoding an image).
    check_off_loop: bool = False

    # True only for a predict() that is trivially cheap (microseconds) and never blocks: no
    # I/O, no sleep, no lock, no heavy numpy. The batcher then calls it on the event loop when
    # the model is idle, saving the hop to a model thread and back (~0.1 ms per call, measured
    # by bench/runtime.py). A wrong True stalls every other call of the server while predict
    # runs. Batching with a queue delay, and calls arriving while a batch runs, still use the
    # model threads. Real models leave it False; the identity kind sets it only when it has no
    # --delay-ms / --batch-cost-ms (those sleep).
    runs_inline: bool = False

    def check(self, inputs: Arrays, params: Params) -> None:  # noqa: B027 - optional hook
        """Refuse one request before it is queued, when the signature cannot say what is wrong
        (NaN in a query, a version mismatch, an undecodable image …): raise InvalidInput /
        FailedPrecondition. It may replace inputs with decoded forms the model prefers."""

    def meta(self) -> dict[str, str]:
        """Extra registry meta for this model (indexer: index, shard, dim …); strings only."""
        return {}

    # -- grouped calls (indexers: one call searches several shards of one process) ----------

    def shard_meta(self) -> dict[str, dict[str, str]]:
        """Shard id → its registry meta, for a model that answers shards by name in one call
        (indexers; the process registers once per shard). Empty for every other kind."""
        return {}

    def search_shard(self, shard: str, inputs: Arrays, params: Params) -> Arrays:
        """check() and predict() of one shard named in a grouped call (runs like predict())."""
        raise NotImplementedError(f"{self.role} models answer no shards")

    def release_shard(self, shard: str, reason: str) -> bool:
        """Stop serving `shard` for good and let go of its memory (it was retired: no registration of
        this process will name it again); later calls naming it are NOT_FOUND with `reason`. True if
        the shard was let go; a model that cannot (one serving a single shard) keeps it."""
        return False

    def batch_key(self, inputs: Arrays, params: Params) -> Any:
        """Requests merge into one batch only when their keys are equal. The default: same
        parameters and the same non-batch dimensions of every numeric input."""
        dims = tuple(
            (name, None if isinstance(v, list) else v.shape[1:])
            for name, v in sorted(inputs.items())
        )
        return (dims, tuple(sorted(params.items())))

    def batch(self, requests: Sequence[Arrays]) -> Arrays:
        """Merge several requests' inputs (all with equal batch_key) along the first dimension."""
        if len(requests) == 1:
            return requests[0]
        merged: Arrays = {}
        for name, first in requests[0].items():
            if isinstance(first, list):
                joined: list[bytes] = []
                for req in requests:
                    joined.extend(req[name])  # type: ignore[arg-type]
                merged[name] = joined
            else:
                merged[name] = np.concatenate([req[name] for req in requests], axis=0)
        return merged

    def unbatch(self, outputs: Arrays, sizes: Sequence[int]) -> list[Arrays]:
        """Split merged outputs back into one dict per request, `sizes[i]` rows each."""
        if len(sizes) == 1:
            return [outputs]
        parts: list[Arrays] = [{} for _ in sizes]
        for name, value in outputs.items():
            start = 0
            for i, n in enumerate(sizes):
                parts[i][name] = value[start : start + n]
                start += n
        return parts
