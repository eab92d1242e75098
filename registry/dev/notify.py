"""Wake-ups for blocking queries: one future per waiting request, woken by topic, no polling."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Hashable

DEFAULT_WAIT_S = 300.0  # Consul's default blocking wait
MAX_WAIT_S = 600.0  # Consul's cap
JITTER_FRACTION = 16  # Consul adds up to wait/16 so that watchers do not return in lockstep


class Notifier:
    """Topic → waiting futures. Topics are service names, "catalog", or KV prefixes."""

    def __init__(self) -> None:
        self._waiters: dict[Hashable, set[asyncio.Future[None]]] = {}
        self._kv_prefixes: dict[str, set[asyncio.Future[None]]] = {}

    def notify(self, topic: Hashable) -> None:
        for fut in self._waiters.pop(topic, ()):
            if not fut.done():
                fut.set_result(None)

    def notify_kv(self, key: str) -> None:
        """Wake every KV watcher whose prefix covers `key`."""
        for prefix in [p for p in self._kv_prefixes if key.startswith(p)]:
            for fut in self._kv_prefixes.pop(prefix, ()):
                if not fut.done():
                    fut.set_result(None)

    def waiter(self, topics: tuple[Hashable, ...], kv_prefix: str | None = None) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for topic in topics:
            self._waiters.setdefault(topic, set()).add(fut)
        if kv_prefix is not None:
            self._kv_prefixes.setdefault(kv_prefix, set()).add(fut)
        return fut

    def forget(self, fut: asyncio.Future[None], topics: tuple[Hashable, ...],
               kv_prefix: str | None = None) -> None:
        for topic in topics:
            waiting = self._waiters.get(topic)
            if waiting is not None:
                waiting.discard(fut)
                if not waiting:
                    del self._waiters[topic]
        if kv_prefix is not None:
            waiting = self._kv_prefixes.get(kv_prefix)
            if waiting is not None:
                waiting.discard(fut)
                if not waiting:
                    del self._kv_prefixes[kv_prefix]

    def waiting(self) -> int:
        futs: set[asyncio.Future[None]] = set()
        for group in (*self._waiters.values(), *self._kv_prefixes.values()):
            futs |= group
        return len(futs)


def blocking_timeout(wait_s: float | None) -> float:
    """Consul's rule: absent or ≤ 0 → 5 m, capped at 10 m, plus up to wait/16 of jitter."""
    wait = DEFAULT_WAIT_S if wait_s is None or wait_s <= 0 else min(wait_s, MAX_WAIT_S)
    return wait + random.uniform(0, wait / JITTER_FRACTION)


async def block_until_changed(
    notifier: Notifier,
    index_of: Callable[[], int],
    min_index: int,
    wait_s: float | None,
    topics: tuple[Hashable, ...] = (),
    kv_prefix: Callable[[], str | None] | None = None,
) -> int:
    """Wait until `index_of()` exceeds `min_index` or the wait runs out; return the index.

    The caller builds its answer right after this returns, without awaiting in between, so
    the answer matches the index.
    """
    index = index_of()
    if min_index <= 0 or index > min_index:
        return index
    loop = asyncio.get_running_loop()
    deadline = loop.time() + blocking_timeout(wait_s)
    while index <= min_index:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        prefix = kv_prefix() if kv_prefix else None
        fut = notifier.waiter(topics, prefix)
        timer = loop.call_later(remaining, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()
            notifier.forget(fut, topics, prefix)
        index = index_of()
    return index


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
