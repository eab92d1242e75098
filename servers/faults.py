"""Fault injection for drills and tests: a model that is slower than it should be.

Like a service mesh's fault filter, this is opt-in per process (`serve … --inject-delay-ms`) and
never on by default; it lets an operator prove that deadlines, hedging and ejection work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from meshserve.servers.model import Model
from meshserve.wire.signature import Arrays, Params


class DelayedModel(Model):
    """Wraps a model; every model call (a whole batch) first sleeps `delay_ms`."""

    def __init__(self, inner: Model, delay_ms: float):
        if delay_ms < 0:
            raise ValueError("--inject-delay-ms must be ≥ 0")
        self.inner = inner
        self.delay_s = delay_ms / 1000.0
        self.name, self.version, self.role = inner.name, inner.version, inner.role
        self.signature = inner.signature

    def load(self) -> None:
        self.inner.load()

    def warmup(self) -> None:
        self.inner.warmup()

    def check(self, inputs: Arrays, params: Params) -> None:
        self.inner.check(inputs, params)

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        time.sleep(self.delay_s)
        return self.inner.predict(inputs, params)

    def meta(self) -> dict[str, str]:
        return self.inner.meta()

    def batch_key(self, inputs: Arrays, params: Params) -> Any:
        return self.inner.batch_key(inputs, params)

    def batch(self, requests: Sequence[Arrays]) -> Arrays:
        return self.inner.batch(requests)

    def unbatch(self, outputs: Arrays, sizes: Sequence[int]) -> list[Arrays]:
        return self.inner.unbatch(outputs, sizes)
