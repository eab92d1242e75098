"""Blocking-query watches of Consul: passing instances of a service, and a KV prefix.

A watch keeps the last result Consul gave it. When the agent cannot be reached it keeps
serving that result marked `stale` (never an empty set because the agent blinked), backs
off with jitter, and reconciles with a non-blocking read as soon as the agent answers.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType, TracebackType
from typing import Any, Generic, TypeVar

import aiohttp
import consul
import consul.exceptions

from meshserve.errors import InvalidInput
from meshserve.registry import watch_metrics
from meshserve.registry.client import go_duration, kv_items_to_dict
from meshserve.registry.config import RegistryConfig
from meshserve.registry.consul_http import AsyncConsul, open_consul
from meshserve.registry.instances import Instance, instances_from_health

log = logging.getLogger(__name__)

V = TypeVar("V")
S = TypeVar("S", bound="Snapshot[Any]")


@dataclass(frozen=True)
class WatchConfig:
    """How a watch polls. Defaults suit production; tests shorten the backoff."""

    wait_s: float = 30.0  # blocking-query wait; also bounds how long a dead link goes unnoticed
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 3.0
    # Token bucket on the loop: a flapping service cannot turn a watch into a busy loop.
    rate_per_s: float = 20.0
    burst: int = 10
    # Consul's docs recommend `stale` for read-heavy discovery: any server answers
    # (reads scale and survive a lost leader), usually within ~50 ms of the leader;
    # `consistent` costs a quorum round trip per read and is meant for locks/elections.
    # The watch needs availability during outages more than linearizability.
    consistency: str = "stale"
    # While a blocking query waits, ask the agent this often (s) whether it answers at all: a hung
    # agent (process stopped, host cut off) keeps a blocking query silent for its whole wait, so
    # without probes it would go unnoticed (and the watch not stale) for up to wait_s. 0: no probes.
    probe_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.probe_interval_s < 0:
            raise ValueError(f"probe_interval_s must be >= 0, got {self.probe_interval_s}")
        if not 0 < self.wait_s <= 600:
            raise ValueError(f"wait_s must be in (0, 600] (Consul caps waits at 10m), got {self.wait_s}")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        if not self.rate_per_s > 0 or self.burst < 1:
            raise ValueError("need rate_per_s > 0 and burst >= 1")
        if self.consistency not in ("default", "stale", "consistent"):
            raise ValueError("consistency must be default, stale or consistent")


@dataclass(frozen=True)
class Snapshot(Generic[V]):
    """What a watch knows at one moment. Immutable: hold on to it as long as you like."""

    target: str
    value: V
    version: int  # +1 on every change of value or staleness
    index: int  # X-Consul-Index of the result (0 before the first answer)
    ready: bool  # Consul has answered at least once
    stale: bool  # the value may be out of date: Consul is not answering
    stale_since: float | None  # time.time() when it stopped answering
    last_contact: float | None  # time.time() of the last answer
    error: str | None = None  # the last failure while stale


class ServiceSnapshot(Snapshot[tuple[Instance, ...]]):
    @property
    def instances(self) -> tuple[Instance, ...]:
        return self.value


class KVSnapshot(Snapshot[Mapping[str, str]]):
    @property
    def values(self) -> Mapping[str, str]:
        return self.value


OnChange = Callable[[Any], Awaitable[None] | None]


class _TokenBucket:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    async def take(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            await asyncio.sleep((1 - self.tokens) / self.rate)
            self.tokens = 1.0
            self.stamp = time.monotonic()
        self.tokens -= 1


def backoff_delay(attempt: int, initial: float, cap: float) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, capped."""
    ceiling = min(cap, initial * (2 ** max(0, attempt - 1)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


# Failures a watch rides out; anything else is a bug and is logged with its traceback.
_EXPECTED = (consul.ConsulException, aiohttp.ClientError, OSError, asyncio.TimeoutError)


class _Feed:
    """One blocking-query loop against one endpoint, fanned out to every watch on it.

    Watches of the same target with the same settings in one event loop share a feed, so
    N watches cost Consul one blocking query, and each answer is decoded once.
    """

    def __init__(self, key: Hashable, first: _BlockingWatch[Any, Any]):
        self.key = key
        self.kind, self.target = first.kind, first.target
        self.config, self.watch_config = first.config, first.watch_config
        self.path, self.extra = first._request()
        self.parse = first._parse
        self.watches: list[_BlockingWatch[Any, Any]] = []
        self.index = 0
        self.value: Any = None
        self.ready = False
        self.error: BaseException | None = None
        self.stale_since = time.time()  # wall clock, for readers
        self.last_ok = time.monotonic()  # for the staleness gauge
        self._task: asyncio.Task[None] | None = None
        self._consul: AsyncConsul | None = None
        self._bucket = _TokenBucket(self.watch_config.rate_per_s, self.watch_config.burst)
        self._errors = watch_metrics.WATCH_ERRORS.labels(self.kind, self.target)

    async def join(self, watch: _BlockingWatch[Any, Any]) -> None:
        self.watches.append(watch)
        if self._task is None:
            self._consul = open_consul(self.config)
            self._task = asyncio.create_task(self._run(), name=f"{self.kind}:{self.target}")
            return
        if self.ready:  # a latecomer starts from what the feed already knows
            await watch._publish_answer(self.value, self.index)
        if self.error is not None:
            await watch._mark_stale(self.error, self.stale_since)

    async def leave(self, watch: _BlockingWatch[Any, Any]) -> None:
        if watch in self.watches:
            self.watches.remove(watch)
        if self.watches:
            return
        if _FEEDS.get(self.key) is self:
            del _FEEDS[self.key]
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            if task is asyncio.current_task():
                return  # stopped from an on_change callback: the loop ends when it returns
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _query(self, params: list[tuple[str, Any]]) -> tuple[int, Any]:
        # Through py-consul's HTTP layer rather than health.service()/kv.get(): those do not
        # take a consistency mode (health) and always decode; the raw body lets identical
        # answers skip decoding (see _ParseCache).
        assert self._consul is not None
        raw_index, body = await self._consul.http.get(
            _raw_answer,
            self.path,
            params=[*params, *self.extra],
            headers=self._consul.prepare_headers(),
        )
        return _index_of(raw_index), _PARSED.get(self.kind, body, self.parse)

    async def _answer(self, params: list[tuple[str, Any]], budget: float) -> tuple[int, Any]:
        """The query's answer within `budget` s; a blocking query is given up as soon as a probe
        of the agent goes unanswered."""
        interval = self.watch_config.probe_interval_s
        async with asyncio.timeout(budget):
            query = asyncio.ensure_future(self._query(params))
            try:
                while interval and self.index > 0:
                    done, _ = await asyncio.wait({query}, timeout=interval)
                    if done:
                        break
                    await self._probe()
                return await query
            finally:
                query.cancel()

    async def _probe(self) -> None:
        """Any answer to a cheap request shows the agent alive; none within the request timeout
        raises TimeoutError (a failure like any other: the watch goes stale and re-reads)."""
        assert self._consul is not None
        async with asyncio.timeout(self.config.request_timeout_s):
            await self._consul.http.get(lambda response: None, "/v1/status/leader",
                                        headers=self._consul.prepare_headers())  # fmt: skip

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:
            if self._consul is not None:
                consul_client, self._consul = self._consul, None
                await consul_client.close()

    async def _loop(self) -> None:
        cfg = self.watch_config
        failures = 0
        while True:
            await self._bucket.take()
            params: list[tuple[str, Any]] = []
            if self.index > 0:
                params += [("index", self.index), ("wait", go_duration(cfg.wait_s))]
            if cfg.consistency != "default":
                params.append((cfg.consistency, "1"))
            # Consul may hold a blocking query up to wait + wait/16 (jitter) before answering.
            budget = self.config.request_timeout_s
            if self.index > 0:
                budget += cfg.wait_s * 17 / 16
            try:
                new_index, value = await self._answer(params, budget)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the watch must outlive any failure
                failures += 1
                await self._failed(exc)
                # After an outage, re-read without blocking: that both clears `stale` at
                # once and picks up whatever changed while the agent was away.
                self.index = 0
                delay = backoff_delay(failures, cfg.backoff_initial_s, cfg.backoff_max_s)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if new_index < 1:
                # Consul promises indexes > 0, and its advice for a server that breaks the
                # promise is to ask from 1: with 0 every next query would return at once,
                # a near-busy loop; from 1 it blocks until something changes.
                new_index = 1
            elif new_index < self.index:
                # Index went backwards (agent restarted without state, stale follower,
                # snapshot restore): start over from a fresh non-blocking read.
                log.info("%s %s: index went back %s → %s; resetting",
                         self.kind, self.target, self.index, new_index)  # fmt: skip
                new_index = 0
            if self.error is not None:
                log.info("%s %s: Consul answers again; reconciled", self.kind, self.target)
            self.index, self.value, self.ready, self.error = new_index, value, True, None
            self.last_ok = time.monotonic()
            for watch in list(self.watches):
                await watch._publish_answer(value, new_index)

    async def _failed(self, exc: BaseException) -> None:
        self._errors.inc()
        if not isinstance(exc, _EXPECTED):
            log.error("%s %s: unexpected failure", self.kind, self.target, exc_info=exc)
        elif self.error is None:
            log.warning("%s %s: Consul at %s unreachable (%s: %s); serving the last known result",
                        self.kind, self.target, self.config.http_addr, type(exc).__name__, exc)  # fmt: skip
        if self.error is None and self.ready:
            self.stale_since = time.time()
        self.error = exc
        for watch in list(self.watches):
            await watch._mark_stale(exc, self.stale_since)


# Live feeds by (event loop, endpoint, settings); a feed leaves when its last watch stops.
_FEEDS: dict[Hashable, _Feed] = {}


class _BlockingWatch(Generic[S, V]):
    """What both watches share: snapshots, staleness, waiting, callbacks; the loop is a _Feed."""

    kind = "watch"

    def __init__(
        self,
        config: RegistryConfig,
        target: str,
        watch_config: WatchConfig | None = None,
        on_change: OnChange | None = None,
        share: bool = True,
    ):
        self.config = config
        self.target = target
        self.watch_config = watch_config or WatchConfig()
        self.share = share
        self._on_change = on_change
        self._snapshot: S = self._make(
            target=target,
            value=self._empty(),
            version=0,
            index=0,
            ready=False,
            stale=True,
            stale_since=time.time(),
            last_contact=None,
        )
        self._changed = asyncio.Event()
        self._feed: _Feed | None = None
        self._last_ok_monotonic = time.monotonic()
        self._changes = watch_metrics.WATCH_CHANGES.labels(self.kind, target)

    # --- what subclasses define ---------------------------------------------------------

    def _make(self, **fields: Any) -> S:
        raise NotImplementedError

    def _empty(self) -> V:
        raise NotImplementedError

    def _request(self) -> tuple[str, list[tuple[str, Any]]]:
        """(path, extra query parameters) of this watch's endpoint."""
        raise NotImplementedError

    def _parse(self, data: Any) -> V:
        """Decoded JSON (None for a 404) → the immutable value readers get."""
        raise NotImplementedError

    # --- public surface -----------------------------------------------------------------

    @property
    def snapshot(self) -> S:
        return self._snapshot

    @property
    def stale(self) -> bool:
        return self._snapshot.stale

    @property
    def staleness_s(self) -> float:
        """Seconds since Consul last answered, while stale; 0 while fresh."""
        if not self._snapshot.stale:
            return 0.0
        last = self._feed.last_ok if self._feed is not None else self._last_ok_monotonic
        return time.monotonic() - last

    @property
    def size(self) -> int:
        return len(self._snapshot.value)  # type: ignore[arg-type]

    async def start(self, first_answer_timeout: float | None = None) -> None:
        """Join (or start) the feed and wait, bounded, for a first answer or failure."""
        if self._feed is not None:
            return
        path, extra = self._request()
        key: Hashable = (
            id(asyncio.get_running_loop()),
            self.kind,
            path,
            tuple(extra),
            self.config,
            self.watch_config,
            None if self.share else id(self),
        )
        feed = _FEEDS.get(key)
        if feed is None:
            feed = _FEEDS[key] = _Feed(key, self)
        self._feed = feed
        watch_metrics.track(self.kind, self.target, self)
        await feed.join(self)
        timeout = self.config.request_timeout_s
        if first_answer_timeout is not None:
            timeout = first_answer_timeout
        try:
            await self.wait_for_change(timeout=timeout, since=0)
        except TimeoutError:
            pass  # still stale/not ready; the feed keeps trying

    async def stop(self) -> None:
        feed, self._feed = self._feed, None
        if feed is not None:
            await feed.leave(self)
        watch_metrics.untrack(self.kind, self.target, self)

    async def __aenter__(self: Any) -> Any:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_for_change(self, timeout: float | None = None, since: int | None = None) -> S:
        """The next snapshot newer than version `since` (default: the current one).

        Raises TimeoutError when nothing changes within `timeout` seconds.
        """
        since = self._snapshot.version if since is None else since
        async with asyncio.timeout(timeout):
            while self._snapshot.version <= since:
                await self._changed.wait()
        return self._snapshot

    async def wait_for(self, predicate: Callable[[S], bool], timeout: float | None = None) -> S:
        """The first snapshot (current or future) for which `predicate` holds."""
        async with asyncio.timeout(timeout):
            snap = self._snapshot
            while not predicate(snap):
                snap = await self.wait_for_change(since=snap.version)
        return snap

    async def updates(self) -> AsyncIterator[S]:
        """The current snapshot, then each change (fast changes may coalesce)."""
        snap = self._snapshot
        yield snap
        while True:
            snap = await self.wait_for_change(since=snap.version)
            yield snap

    def __aiter__(self) -> AsyncIterator[S]:
        return self.updates()

    # --- fed by the _Feed ---------------------------------------------------------------

    async def _mark_stale(self, exc: BaseException, since: float) -> None:
        error = f"{type(exc).__name__}: {exc}"
        snap = self._snapshot
        if snap.stale and snap.error is not None:
            self._snapshot = replace(snap, error=error)  # already stale: no new change
            return
        stale_since = snap.stale_since if snap.stale else since
        await self._set(
            replace(snap, stale=True, stale_since=stale_since, error=error, version=snap.version + 1)
        )

    async def _publish_answer(self, value: V, index: int) -> None:
        now = time.time()
        self._last_ok_monotonic = time.monotonic()
        snap = self._snapshot
        same = value is snap.value or value == snap.value  # shared parses are identical
        if snap.ready and not snap.stale and same:
            # Timeout or idempotent write: nothing a reader needs to hear about.
            self._snapshot = replace(snap, index=index, last_contact=now)
            return
        if not same:
            self._changes.inc()
        await self._set(
            replace(
                snap,
                value=value,
                index=index,
                ready=True,
                stale=False,
                stale_since=None,
                last_contact=now,
                error=None,
                version=snap.version + 1,
            )
        )

    async def _set(self, snap: S) -> None:
        """Publish a new version: wake waiters, then tell the on_change callback."""
        self._snapshot = snap
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        if self._on_change is not None:
            try:
                result = self._on_change(snap)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - a consumer's bug must not stop discovery
                log.exception("%s %s: on_change callback failed", self.kind, self.target)


def _raw_answer(response: Any) -> tuple[Any, str | None]:
    """py-consul response callback: (X-Consul-Index, body or None for 404), errors raised
    as py-consul raises them."""
    code = response.code
    if code == 400:
        raise consul.exceptions.BadRequest(f"400 {response.body}")
    if code == 401:
        raise consul.ACLDisabled(response.body)
    if code == 403:
        raise consul.ACLPermissionDenied(response.body)
    if 400 <= code < 500 and code != 404:
        raise consul.exceptions.ClientError(f"{code} {response.body}")
    if code >= 500:
        raise consul.ConsulException(f"{code} {response.body}")
    if "X-Consul-Index" not in response.headers:
        raise consul.ConsulException(f"Missing index header: {dict(response.headers)}")
    return response.headers["X-Consul-Index"], None if code == 404 else response.body


class _ParseCache:
    """Decoded values of recent answer bodies, shared by every watch in the process.

    Many watches of one service (one per gateway flow, or the bench's hundred) receive the
    very same body when it changes; decoding it once instead of N times is most of their
    CPU. Values are immutable, so sharing them is safe.
    """

    def __init__(self, size: int = 64):
        self.size = size
        self._items: OrderedDict[tuple[str, str | None], Any] = OrderedDict()

    def get(self, kind: str, body: str | None, parse: Callable[[Any], Any]) -> Any:
        key = (kind, body)
        try:
            self._items.move_to_end(key)
            return self._items[key]
        except KeyError:
            pass
        try:
            value = parse(json.loads(body) if body is not None else None)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise consul.ConsulException(f"undecodable answer: {exc}") from exc
        self._items[key] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


_PARSED = _ParseCache()


def _index_of(raw: Any) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError) as exc:
        raise consul.ConsulException(f"X-Consul-Index {raw!r} is not a number") from exc


class ServiceWatch(_BlockingWatch[ServiceSnapshot, tuple[Instance, ...]]):
    """The passing instances of one service, kept current by blocking queries.

    `async with ServiceWatch(config, "meshserve-embedder") as w:` then `w.instances`,
    `w.stale`, `await w.wait_for_change(timeout)` or `async for snap in w`.
    """

    kind = "service"

    def __init__(
        self,
        config: RegistryConfig,
        service: str,
        watch_config: WatchConfig | None = None,
        on_change: Callable[[ServiceSnapshot], Awaitable[None] | None] | None = None,
        tag: str | None = None,
        share: bool = True,
    ):
        if not service or "/" in service:
            raise InvalidInput(f"service name {service!r} must be non-empty without '/'")
        self.service = service
        self.tag = tag
        super().__init__(config, service, watch_config, on_change, share)

    @property
    def instances(self) -> tuple[Instance, ...]:
        return self._snapshot.value

    def _make(self, **fields: Any) -> ServiceSnapshot:
        return ServiceSnapshot(**fields)

    def _empty(self) -> tuple[Instance, ...]:
        return ()

    def _request(self) -> tuple[str, list[tuple[str, Any]]]:
        extra = [("passing", "1")] + ([("tag", self.tag)] if self.tag else [])
        return f"/v1/health/service/{self.service}", extra

    def _parse(self, data: Any) -> tuple[Instance, ...]:
        return instances_from_health(data)


class KVWatch(_BlockingWatch[KVSnapshot, Mapping[str, str]]):
    """Every key under a prefix (e.g. "meshserve/") → its value as text, kept current."""

    kind = "kv"

    def __init__(
        self,
        config: RegistryConfig,
        prefix: str,
        watch_config: WatchConfig | None = None,
        on_change: Callable[[KVSnapshot], Awaitable[None] | None] | None = None,
        share: bool = True,
    ):
        if not isinstance(prefix, str) or prefix.startswith("/"):
            raise InvalidInput(f"KV prefix {prefix!r} must not start with '/'")
        self.prefix = prefix
        super().__init__(config, prefix, watch_config, on_change, share)

    @property
    def values(self) -> Mapping[str, str]:
        return self._snapshot.value

    def _make(self, **fields: Any) -> KVSnapshot:
        return KVSnapshot(**fields)

    def _empty(self) -> Mapping[str, str]:
        return MappingProxyType({})

    def _request(self) -> tuple[str, list[tuple[str, Any]]]:
        return f"/v1/kv/{self.prefix}", [("recurse", "1")]

    def _parse(self, data: Any) -> Mapping[str, str]:
        items = [
            {**item, "Value": base64.b64decode(item["Value"]) if item.get("Value") else None}
            for item in data or ()
        ]
        return MappingProxyType(kv_items_to_dict(items))
