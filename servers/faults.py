"""Fault injection for drills and tests: a model that is slower than it should be, or that fails.

Like a service mesh's fault filter, this is opt-in per process (`serve … --inject-delay-ms`,
`--inject-error-rate`) and never on by default; it lets an operator prove that deadlines, hedging,
ejection and automatic rollout rollback work.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from meshserve.servers.model import Model
from meshserve.wire.signature import Arrays, Params


class InjectedFault(RuntimeError):
    """The failure `--inject-error-rate` makes a model call raise (INTERNAL to the caller)."""


class _WrappedModel(Model):
    def __init__(self, inner: Model):
        self.inner = inner
        self.name, self.version, self.role = inner.name, inner.version, inner.role
        self.signature = inner.signature

    def load(self) -> None:
        self.inner.load()

    def warmup(self) -> None:
        self.inner.warmup()

    def check(self, inputs: Arrays, params: Params) -> None:
        self.inner.check(inputs, params)

    def fault(self) -> None:
        """What goes wrong in each model call (a subclass's)."""

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        self.fault()
        return self.inner.predict(inputs, params)

    def search_shard(self, shard: str, inputs: Arrays, params: Params) -> Arrays:
        self.fault()
        return self.inner.search_shard(shard, inputs, params)

    def release_shard(self, shard: str, reason: str) -> bool:
        return self.inner.release_shard(shard, reason)

    def meta(self) -> dict[str, str]:
        return self.inner.meta()

    def shard_meta(self) -> dict[str, dict[str, str]]:
        return self.inner.shard_meta()

    def batch_key(self, inputs: Arrays, params: Params) -> Any:
        return self.inner.batch_key(inputs, params)

    def batch(self, requests: Sequence[Arrays]) -> Arrays:
        return self.inner.batch(requests)

    def unbatch(self, outputs: Arrays, sizes: Sequence[int]) -> list[Arrays]:
        return self.inner.unbatch(outputs, sizes)


class DelayedModel(_WrappedModel):
    """Wraps a model; every model call (a whole batch) first sleeps `delay_ms`."""

    def __init__(self, inner: Model, delay_ms: float):
        if delay_ms < 0:
            raise ValueError("--inject-delay-ms must be ≥ 0")
        super().__init__(inner)
        self.delay_s = delay_ms / 1000.0

    def fault(self) -> None:
        time.sleep(self.delay_s)


class ErroringModel(_WrappedModel):
    """Wraps a model; each model call (a whole batch) fails with probability `error_rate`."""

    def __init__(self, inner: Model, error_rate: float, rng: random.Random | None = None):
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError("--inject-error-rate must be in [0, 1]")
        super().__init__(inner)
        self.error_rate = error_rate
        self._random = rng or random.Random()

    def fault(self) -> None:
        if self._random.random() < self.error_rate:
            raise InjectedFault(f"injected fault (--inject-error-rate {self.error_rate:g})")
