"""Watch loop rules against a scripted Consul HTTP server: index resets, staleness, recovery.

The dev agent never sends an index that goes backwards or a 500 on purpose, so these
cases are played by a small real HTTP server that answers each request from a script.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from meshserve.registry.config import RegistryConfig
from meshserve.registry.watch import KVWatch, ServiceWatch, WatchConfig, backoff_delay
from tests.support import free_port

FAST = WatchConfig(wait_s=5, backoff_initial_s=0.01, backoff_max_s=0.05, rate_per_s=1000, burst=100)


def entry(service_id: str, port: int, meta: dict[str, str] | None = None, address: str = "") -> Any:
    return {
        "Node": {"Node": "node-1", "Address": "10.0.0.9"},
        "Service": {
            "ID": service_id,
            "Service": "svc",
            "Address": address,
            "Port": port,
            "Meta": meta or {},
            "Tags": ["t1"],
        },
        "Checks": [],
    }


class ScriptedConsul:
    """Answers each request with the next scripted (status, index, body); waits for one."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.headers: list[dict[str, str]] = []
        self.script: asyncio.Queue[tuple[int, int, Any]] = asyncio.Queue()
        self.arrived = asyncio.Event()
        # When set, non-blocking reads (no index) get this at once instead of a scripted turn.
        self.current: tuple[int, Any] | None = None

    def answer(self, index: int, body: Any, status: int = 200) -> None:
        self.script.put_nowait((status, index, body))

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.query))
        self.headers.append(dict(request.headers))
        self.arrived.set()
        if self.current is not None and "index" not in request.query:
            status, (index, body) = 200, self.current
        else:
            status, index, body = await self.script.get()
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(status=status, text=text, headers={"X-Consul-Index": str(index)})

    async def next_request(self, count: int, timeout: float = 5.0) -> dict[str, str]:
        """Wait until request number `count` (1-based) has arrived and return its query."""
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.requests[count - 1]


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedConsul, RegistryConfig]]:
    fake = ScriptedConsul()
    app = web.Application()
    app.router.add_get("/v1/health/service/{name}", fake.handle)
    app.router.add_get("/v1/kv/{key:.*}", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield fake, RegistryConfig(http_addr=f"http://127.0.0.1:{port}", request_timeout_s=2)
    finally:
        for _ in range(50):  # release handlers still waiting so the runner can stop
            fake.answer(1, [])
        await runner.cleanup()


async def test_first_read_does_not_block_then_blocks_on_the_index(scripted):
    fake, config = scripted
    fake.answer(7, [entry("a", 5001, {"model": "m"}), entry("b", 5002, address="127.0.0.2")])
    async with ServiceWatch(config, "svc", FAST) as watch:
        first = await fake.next_request(1)
        assert "index" not in first and "wait" not in first
        assert first["passing"] == "1" and "stale" in first  # consistency mode chosen: stale
        assert [i.id for i in watch.instances] == ["a", "b"]
        a, b = watch.instances
        assert (a.address, a.port, dict(a.meta), a.tags) == ("10.0.0.9", 5001, {"model": "m"}, ("t1",))
        assert b.target == "127.0.0.2:5002"
        assert not watch.stale and watch.snapshot.ready and watch.snapshot.index == 7
        second = await fake.next_request(2)
        assert second["index"] == "7" and second["wait"] == "5s"


async def test_index_going_backwards_resets_to_a_non_blocking_read(scripted):
    fake, config = scripted
    fake.answer(50, [entry("a", 1)])
    async with ServiceWatch(config, "svc", FAST) as watch:
        assert (await fake.next_request(2))["index"] == "50"
        fake.answer(3, [entry("b", 2)])  # the agent lost its state and restarted
        snap = await watch.wait_for_change(timeout=5)
        assert [i.id for i in snap.instances] == ["b"]
        assert "index" not in await fake.next_request(3)
        fake.answer(3, [entry("b", 2)])
        assert (await fake.next_request(4))["index"] == "3"


async def test_an_index_below_one_is_clamped_to_one_so_the_next_query_blocks(scripted):
    fake, config = scripted
    fake.answer(0, [entry("a", 1)])
    async with ServiceWatch(config, "svc", FAST) as watch:
        second = await fake.next_request(2)
        assert second["index"] == "1" and second["wait"] == "5s"
        assert [i.id for i in watch.instances] == ["a"]


class ZeroIndexConsul:
    """A Consul whose index stays 0 (the server bug Consul's docs warn clients of), blocking the
    way Consul does: a query whose `index` is at or above the current one waits for `wait`."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if int(request.query.get("index", "0")) >= 1:
            await asyncio.sleep(float(request.query["wait"].rstrip("s")))
        return web.Response(text=json.dumps([entry("a", 1)]), headers={"X-Consul-Index": "0"})


async def test_a_registry_answering_index_zero_costs_a_request_per_wait_not_a_busy_loop() -> None:
    fake = ZeroIndexConsul()
    app = web.Application()
    app.router.add_get("/v1/health/service/{name}", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = RegistryConfig(http_addr=f"http://127.0.0.1:{port}", request_timeout_s=2)
    try:
        # the production rate limit (20/s), which alone would allow ~40 requests in the window
        async with ServiceWatch(config, "svc", WatchConfig(wait_s=5)) as watch:
            assert [i.id for i in watch.instances] == ["a"]
            await asyncio.sleep(2.0)  # the window over which requests are counted
            assert fake.requests <= 2, fake.requests  # the first read, then one blocking query
    finally:
        await runner.cleanup()


async def test_errors_keep_the_last_set_marked_stale_and_recovery_reconciles(scripted):
    fake, config = scripted
    fake.answer(10, [entry("a", 1), entry("b", 2)])
    changes: list[Any] = []
    async with ServiceWatch(config, "svc", FAST, on_change=changes.append) as watch:
        before = watch.snapshot
        fake.answer(10, "boom", status=500)
        stale = await watch.wait_for_change(timeout=5)
        assert stale.stale and stale.stale_since is not None and "500" in (stale.error or "")
        assert [i.id for i in stale.instances] == ["a", "b"]  # never emptied by an outage
        assert watch.staleness_s > 0
        # The next read after an error does not block: it must clear `stale` at once.
        n = len(fake.requests) + 1
        query = await fake.next_request(n)
        assert "index" not in query
        fake.answer(11, [entry("b", 2)])
        fresh = await watch.wait_for(lambda s: not s.stale, timeout=5)
        assert [i.id for i in fresh.instances] == ["b"] and fresh.stale_since is None
        assert watch.staleness_s == 0
    versions = [s.version for s in changes]
    assert versions == sorted(versions) and versions[0] == before.version
    assert [s.stale for s in changes] == [False, True, False]


async def test_unreachable_agent_at_start_is_stale_and_empty_not_an_exception():
    config = RegistryConfig(http_addr=f"http://127.0.0.1:{free_port()}", request_timeout_s=1)
    async with ServiceWatch(config, "svc", FAST) as watch:
        assert watch.stale and not watch.snapshot.ready and watch.instances == ()
        assert "ClientConnectorError" in (watch.snapshot.error or "")


async def test_updates_iterator_yields_current_then_changes(scripted):
    fake, config = scripted
    fake.answer(1, [])
    async with ServiceWatch(config, "svc", FAST) as watch:
        seen: list[tuple[str, ...]] = []

        async def consume() -> None:
            async for snap in watch:
                seen.append(tuple(i.id for i in snap.instances))
                if len(seen) == 3:
                    return

        task = asyncio.create_task(consume())
        await fake.next_request(2)
        fake.answer(2, [entry("a", 1)])
        await fake.next_request(3)
        fake.answer(3, [entry("a", 1), entry("c", 3)])
        await asyncio.wait_for(task, 5)
        assert seen == [(), ("a",), ("a", "c")]


async def test_same_answer_on_wait_timeout_is_not_a_change(scripted):
    fake, config = scripted
    fake.answer(4, [entry("a", 1)])
    async with ServiceWatch(config, "svc", FAST) as watch:
        version = watch.snapshot.version
        await fake.next_request(2)
        fake.answer(4, [entry("a", 1)])  # wait elapsed, same index
        await fake.next_request(3)
        assert watch.snapshot.version == version
        with pytest.raises(TimeoutError):
            await watch.wait_for_change(timeout=0.1)


async def test_kv_watch_decodes_values_and_treats_404_as_empty(scripted):
    fake, config = scripted

    def item(key: str, value: bytes | None) -> dict[str, Any]:
        encoded = base64.b64encode(value).decode() if value is not None else None
        return {"Key": key, "Value": encoded, "ModifyIndex": 1, "Flags": 0}

    fake.answer(5, [item("meshserve/a", b'{"w": 1}'), item("meshserve/", None)])
    async with KVWatch(config, "meshserve/", FAST) as watch:
        query = await fake.next_request(1)
        assert query["recurse"] == "1" and "stale" in query
        assert dict(watch.values) == {"meshserve/a": '{"w": 1}', "meshserve/": ""}
        await fake.next_request(2)
        fake.answer(6, "", status=404)
        snap = await watch.wait_for_change(timeout=5)
        assert dict(snap.values) == {} and not snap.stale


async def test_token_from_config_is_sent_and_beats_the_environment(scripted, monkeypatch):
    fake, config = scripted
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    config = RegistryConfig(http_addr=config.http_addr, token="from-config")
    fake.answer(1, [])
    async with ServiceWatch(config, "svc", FAST):
        await fake.next_request(1)
        assert fake.headers[0].get("X-Consul-Token") == "from-config"


def test_backoff_grows_is_capped_and_jittered():
    delays = [backoff_delay(n, 0.1, 2.0) for n in range(1, 12)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(1.0 <= d <= 2.0 for d in delays[6:])
    assert len({round(backoff_delay(5, 0.1, 2.0), 6) for _ in range(20)}) > 1


def test_watch_config_rejects_nonsense():
    with pytest.raises(ValueError, match="wait_s"):
        WatchConfig(wait_s=601)
    with pytest.raises(ValueError, match="consistency"):
        WatchConfig(consistency="eventual")


async def test_watches_of_one_target_share_one_blocking_query(scripted):
    fake, config = scripted
    fake.answer(3, [entry("a", 1)])
    seen: list[tuple[str, tuple[str, ...]]] = []
    first = ServiceWatch(config, "svc", FAST, on_change=lambda s: seen.append(("1", ids(s))))
    second = ServiceWatch(config, "svc", FAST, on_change=lambda s: seen.append(("2", ids(s))))
    await first.start()
    await fake.next_request(2)  # the shared feed is blocking on index 3
    await second.start()  # joins: gets the known set at once, no new request
    assert second.instances == first.instances and second.snapshot.ready
    assert len(fake.requests) == 2
    fake.answer(4, [entry("a", 1), entry("b", 2)])
    await second.wait_for(lambda s: len(s.instances) == 2, timeout=5)
    assert first.instances is second.instances  # decoded once, shared
    await fake.next_request(3)
    assert sum("index" in q for q in fake.requests) == 2  # one blocking query per round

    await first.stop()  # the feed lives on for the second watch
    fake.answer(5, "down", status=500)
    await second.wait_for(lambda s: s.stale, timeout=5)
    assert first.snapshot.version == 2 and not first.stale  # stopped: no longer fed
    latecomer = ServiceWatch(config, "svc", FAST)
    await latecomer.start(first_answer_timeout=0.5)
    assert latecomer.stale and len(latecomer.instances) == 2  # last known set, marked stale
    await asyncio.gather(second.stop(), latecomer.stop())
    assert seen[:2] == [("1", ("a",)), ("2", ("a",))]


async def test_share_false_gives_a_watch_its_own_query(scripted):
    fake, config = scripted
    fake.current = (3, [entry("a", 1)])
    async with (
        ServiceWatch(config, "svc", FAST) as shared,
        ServiceWatch(config, "svc", FAST, share=False) as private,
    ):
        assert shared.instances == private.instances and private.snapshot.ready
        assert sum("index" not in q for q in fake.requests) == 2


def ids(snap: Any) -> tuple[str, ...]:
    return tuple(i.id for i in snap.instances)


async def test_callback_errors_do_not_stop_the_watch_and_it_can_stop_itself(scripted):
    fake, config = scripted
    fake.answer(1, [entry("a", 1)])
    calls: list[int] = []

    def broken(snap: Any) -> None:
        calls.append(snap.version)
        raise RuntimeError("consumer bug")

    async with ServiceWatch(config, "svc", FAST, on_change=broken) as watch:
        await fake.next_request(2)
        fake.answer(2, [entry("a", 1), entry("b", 2)])
        await watch.wait_for(lambda s: len(s.instances) == 2, timeout=5)
    assert calls == [1, 2]

    stopped = asyncio.Event()

    async def stop_on_first(snap: Any) -> None:
        await quitter.stop()
        stopped.set()

    fake.current = (5, [entry("a", 1)])
    quitter = ServiceWatch(config, "svc", FAST, on_change=stop_on_first)
    await quitter.start()
    await asyncio.wait_for(stopped.wait(), 5)
    await asyncio.sleep(0.05)
    assert quitter.snapshot.ready and not [f for f in _feeds() if f.watches]


def _feeds() -> list[Any]:
    from meshserve.registry import watch as watch_module

    return list(watch_module._FEEDS.values())
