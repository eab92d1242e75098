"""What a watch costs the real dev agent, counted by a proxy in front of it: an idle watch sends one
blocking query per wait, also after the agent restarted without its state and answers with lower
indexes (the watch starts over once, then blocks again, as Consul's docs ask of clients)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import consul
import pytest
from aiohttp import web

from meshserve.registry.config import RegistryConfig
from meshserve.registry.watch import ServiceWatch, WatchConfig
from tests.support import DevAgent, free_port

WINDOW_S = 2.0  # requests are counted over this long while nothing changes


class CountingProxy:
    """Forwards every request to the agent and counts them; 502 while the agent is away."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.requests = 0
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        assert self.session is not None
        try:
            async with self.session.get(self.upstream + request.path_qs, headers=request.headers) as resp:
                body = await resp.read()
                headers = {k: v for k, v in resp.headers.items() if k.lower().startswith("x-consul")}
                return web.Response(status=resp.status, body=body, headers=headers, content_type=resp.content_type)
        except aiohttp.ClientError as exc:
            return web.Response(status=502, text=f"agent unreachable: {exc}")


@pytest.fixture
async def proxied(start_dev_agent: Callable[..., DevAgent]) -> AsyncIterator[tuple[DevAgent, CountingProxy, str]]:
    agent = start_dev_agent()  # in memory: a restart forgets everything and indexes start over
    proxy = CountingProxy(agent.http_addr)
    proxy.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield agent, proxy, f"http://127.0.0.1:{port}"
    finally:
        await proxy.session.close()
        await runner.cleanup()


async def test_an_idle_watch_sends_one_query_per_wait_also_after_indexes_go_backwards(
    proxied: tuple[DevAgent, CountingProxy, str],
) -> None:
    agent, proxy, proxy_addr = proxied
    def register() -> None:  # a TTL check: nothing probes it, so nothing changes until the test says so
        agent.client().agent.service.register("meshserve-embedder", service_id="e-1", port=1,
                                              check=consul.Check.ttl("600s"))  # fmt: skip

    kv = agent.client().kv
    for n in range(30):  # push the agent's index well above where a fresh agent starts
        kv.put(f"filler/{n}", "x")
    register()

    watched = RegistryConfig(http_addr=proxy_addr, request_timeout_s=3)
    async with ServiceWatch(watched, "meshserve-embedder", WatchConfig(wait_s=30)) as watch:
        high = watch.snapshot.index
        assert high > 30
        before = proxy.requests
        await asyncio.sleep(WINDOW_S)
        assert proxy.requests - before <= 1, proxy.requests - before  # the one blocking query in flight

        # (off the event loop: the proxy keeps answering while the agent stops and starts)
        await asyncio.to_thread(agent.stop)
        await asyncio.to_thread(agent.start)  # same port, empty state
        register()
        restarted = time.monotonic()
        async with asyncio.timeout(60):
            while watch.stale or watch.snapshot.index >= high:
                await asyncio.sleep(0.05)
        low, settled_after = watch.snapshot.index, time.monotonic() - restarted
        before = proxy.requests
        await asyncio.sleep(WINDOW_S)
        idle_after = proxy.requests - before
    print(f"\nwatch requests: index {high} → {low} after the agent's restart, settled {settled_after:.1f} s "
          f"after it answered again; {idle_after} request(s) in the {WINDOW_S:.0f} s after that")
    assert idle_after <= 2, idle_after  # (at most the re-read, then one blocking query)
