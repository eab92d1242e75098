"""Registry watch latency (health change → watcher sees it) and register/deregister throughput.

Run:  nice -n 10 python bench/registry_watch.py                 # own dev agent, 200 changes
      nice -n 10 python bench/registry_watch.py --changes 500 --watchers 1,10,100
      python bench/registry_watch.py --consul http://127.0.0.1:8500   # an existing (real) Consul

A change is one TTL check flipped pass ↔ fail, so one instance enters or leaves the passing
set. Latency runs from just before the flip request is sent to the moment a ServiceWatch's
on_change sees the new set. Rows: N independent watchers (share=False: N blocking queries,
the agent's fan-out) and N watchers sharing one query (the default inside one process).
The in-run baselines: a plain non-blocking poll loop (100 ms) against the same agent, the
1-watcher row, and a trivial GET /v1/status/leader for the throughput figures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from consul import Check

from meshserve.registry.client import RegistryClient
from meshserve.registry.config import RegistryConfig, ServiceInstance
from meshserve.registry.consul_http import open_consul
from meshserve.registry.instances import instances_from_health
from meshserve.registry.watch import ServiceSnapshot, ServiceWatch, WatchConfig

SERVICE = "bench-watch"
FLIP_ID = "bench-watch-flip"
ANCHORS = 9  # always-passing instances, so every answer carries a realistic set


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DevAgentProcess:
    """`meshserve registry dev` as a child process for the length of the bench."""

    def __init__(self) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "meshserve.cli", "--log-level", "WARNING",
                "registry", "dev", "--http-addr", f"127.0.0.1:{self.port}"]  # fmt: skip
        self.proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.addr}/v1/status/leader", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the dev agent did not come up") from None
                time.sleep(0.05)

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Flipper:
    """Flips the TTL check of FLIP_ID and records when each observer sees the result."""

    config: RegistryConfig
    observers: int
    present: bool = False
    t0: float = 0.0
    seen: dict[int, float] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def observe(self, who: int, ids: set[str]) -> None:
        if (FLIP_ID in ids) == self.present and who not in self.seen and self.t0:
            self.seen[who] = time.perf_counter()
            if len(self.seen) == self.observers:
                self.done.set()

    async def run(
        self, changes: int, flip: Callable[[bool], object], on_missed: Callable[[], None]
    ) -> tuple[list[float], list[float]]:
        """(latency of every observer and change, latency of the last observer per change)."""
        each: list[float] = []
        last: list[float] = []
        for _ in range(changes):
            self.present = not self.present
            self.seen, self.done = {}, asyncio.Event()
            self.t0 = time.perf_counter()
            await flip(self.present)  # type: ignore[misc]
            try:
                await asyncio.wait_for(self.done.wait(), 5.0)
            except TimeoutError:
                on_missed()
            each += [t - self.t0 for t in self.seen.values()]
            if len(self.seen) == self.observers:
                last.append(max(self.seen.values()) - self.t0)
            # Space changes out: watches rate-limit themselves (20/s, burst 10) by design.
            await asyncio.sleep(random.uniform(0.06, 0.12))
        return each, last


async def setup_service(config: RegistryConfig) -> None:
    async with open_consul(config) as c:
        for n in range(ANCHORS + 1):
            sid = FLIP_ID if n == ANCHORS else f"{SERVICE}-anchor-{n}"
            meta = {"model": "bench", "version": "1", "role": "anchor", "shard": str(n)}
            await c.agent.service.register(SERVICE, service_id=sid, address="127.0.0.1",
                                           port=20000 + n, meta=meta, check=Check.ttl("600s"))  # fmt: skip
            if sid != FLIP_ID:
                await c.agent.check.ttl_pass(f"service:{sid}")
        await c.agent.check.ttl_fail(f"service:{FLIP_ID}")


async def flip_check(client, present: bool) -> None:  # type: ignore[no-untyped-def]
    if present:
        await client.agent.check.ttl_pass(f"service:{FLIP_ID}", notes="bench")
    else:
        await client.agent.check.ttl_fail(f"service:{FLIP_ID}", notes="bench")


async def watch_latency(
    config: RegistryConfig, watchers: int, changes: int, share: bool
) -> dict[str, float]:
    flipper = Flipper(config, watchers)
    missed = 0

    def count_missed() -> None:
        nonlocal missed
        missed += 1

    def on_change_for(who: int) -> Callable[[ServiceSnapshot], None]:
        return lambda snap: flipper.observe(who, {i.id for i in snap.instances})

    watches = [ServiceWatch(config, SERVICE, WatchConfig(), on_change=on_change_for(n), share=share)
               for n in range(watchers)]  # fmt: skip
    await asyncio.gather(*(w.start(first_answer_timeout=10) for w in watches))
    assert all(w.snapshot.ready for w in watches), "some watchers never got a first answer"
    try:
        async with open_consul(config) as client:
            each, last = await flipper.run(changes, lambda present: flip_check(client, present), count_missed)
    finally:
        await asyncio.gather(*(w.stop() for w in watches))
    return {"p50": pct(each, 50), "p99": pct(each, 99), "max": max(each, default=float("nan")),
            "last_p50": pct(last, 50), "last_p99": pct(last, 99), "missed": missed,
            "n": len(each)}  # fmt: skip


async def poll_latency(config: RegistryConfig, changes: int, interval: float) -> dict[str, float]:
    """Baseline: one plain non-blocking GET every `interval`, no index, no blocking."""
    flipper = Flipper(config, 1)
    requests = 0
    stop = asyncio.Event()

    async def poll(client) -> None:  # type: ignore[no-untyped-def]
        nonlocal requests
        while not stop.is_set():
            _, entries = await client.health.service(SERVICE, passing=True)
            requests += 1
            flipper.observe(0, {i.id for i in instances_from_health(entries)})
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass

    async with open_consul(config) as poll_client, open_consul(config) as flip_client:
        task = asyncio.create_task(poll(poll_client))
        each, _ = await flipper.run(changes, lambda p: flip_check(flip_client, p), lambda: None)
        stop.set()
        await task
    return {"p50": pct(each, 50), "p99": pct(each, 99), "max": max(each), "n": len(each),
            "requests_per_change": requests / changes}  # fmt: skip


async def throughput(config: RegistryConfig, count: int, concurrency: int) -> dict[str, float]:
    """register() then deregister() of `count` instances; trivial GETs as the floor."""
    base = ServiceInstance(name="bench-throughput", instance_id="x", address="127.0.0.1",
                           port=1, meta={"model": "bench", "version": "1", "role": "bench"},
                           check_interval_s=2.0, check_timeout_s=0.5,
                           deregister_critical_after_s=60)  # fmt: skip
    instances = [dataclasses.replace(base, instance_id=f"bench-throughput-{n}", port=30000 + n)
                 for n in range(count)]  # fmt: skip
    gate = asyncio.Semaphore(concurrency)
    out: dict[str, float] = {}
    async with RegistryClient(config) as client:

        async def timed(label: str, calls: list) -> None:  # type: ignore[type-arg]
            async def one(make) -> None:  # type: ignore[no-untyped-def]
                async with gate:
                    await make()

            started = time.perf_counter()
            await asyncio.gather(*(one(c) for c in calls))
            out[label] = len(calls) / (time.perf_counter() - started)

        await timed("leader_get", [lambda: client.consul.status.leader() for _ in range(count)])
        await timed("register", [lambda i=i: client.register(i) for i in instances])
        await timed("deregister", [lambda i=i: client.deregister(i.instance_id) for i in instances])
    return out


def show(label: str, r: dict[str, float]) -> None:
    ms = {k: v * 1000 for k, v in r.items() if k in ("p50", "p99", "max", "last_p50", "last_p99")}
    line = f"  {label:<34} p50 {ms['p50']:7.1f} ms   p99 {ms['p99']:7.1f} ms   max {ms['max']:7.1f} ms"
    if "last_p50" in ms:
        line += f"   all-seen p50 {ms['last_p50']:6.1f} / p99 {ms['last_p99']:6.1f} ms"
    if r.get("missed"):
        line += f"   MISSED {int(r['missed'])}"
    if "requests_per_change" in r:
        line += f"   {r['requests_per_change']:.1f} requests/change"
    print(line + f"   (n={int(r['n'])})", flush=True)


async def main_async(args: argparse.Namespace) -> int:
    agent = None if args.consul else DevAgentProcess()
    addr = args.consul or agent.addr  # type: ignore[union-attr]
    config = RegistryConfig.from_env(http_addr=addr)
    agent_pid = agent.proc.pid if agent else None
    try:
        await setup_service(config)
        print(f"registry watch bench against {addr}: {args.changes} changes per row, "
              f"{ANCHORS + 1} instances in the watched set")  # fmt: skip
        results: dict[str, dict[str, float]] = {}
        poll = await poll_latency(config, args.changes, args.poll_interval)
        results["poll"] = poll
        show(f"baseline poll every {args.poll_interval * 1000:.0f} ms", poll)
        rows = [(n, False) for n in args.watchers]
        rows += [(n, True) for n in args.watchers if n > 1]
        for n, share in rows:
            cpu_agent = cpu_seconds(agent_pid) if agent_pid else 0.0
            cpu_self = time.process_time()
            r = await watch_latency(config, n, args.changes, share)
            if agent_pid:
                r["agent_cpu_ms_per_change"] = (cpu_seconds(agent_pid) - cpu_agent) / args.changes * 1000
            r["bench_cpu_ms_per_change"] = (time.process_time() - cpu_self) / args.changes * 1000
            label = f"{n} watchers, one shared query" if share else f"{n} independent watchers"
            results[label] = r
            show(label, r)
            cpu = f"    cpu per change: bench {r['bench_cpu_ms_per_change']:.1f} ms"
            if agent_pid:
                cpu += f", agent {r['agent_cpu_ms_per_change']:.1f} ms"
            print(cpu, flush=True)
        few, many = min(args.watchers), max(args.watchers)
        one = results[f"{few} independent watchers"]
        indep = results[f"{many} independent watchers"]
        print("ratios:")
        print(f"  poll p50 / watch p50 ({few} watcher)        = {poll['p50'] / one['p50']:.1f}x "
              f"(the poll loop sends {poll['requests_per_change']:.1f} requests per change; a watch 1)")  # fmt: skip
        print(f"  p99 {many} independent / {few} watcher        = {indep['p99'] / one['p99']:.1f}x")
        if many > 1:
            shared = results[f"{many} watchers, one shared query"]
            print(f"  p99 {many} independent / {many} sharing       = {indep['p99'] / shared['p99']:.1f}x")
            print(f"  goal p99 <= 50 ms with {many} watchers: independent {indep['p99'] * 1000:.1f} ms "
                  f"({'met' if indep['p99'] <= 0.05 else 'NOT met'}), sharing one query "
                  f"{shared['p99'] * 1000:.1f} ms ({'met' if shared['p99'] <= 0.05 else 'NOT met'})")  # fmt: skip
        t = await throughput(config, args.registrations, 1)
        tc = await throughput(config, args.registrations, 8)
        print(f"throughput ({args.registrations} instances):")
        for label, r in (("sequential", t), ("8 concurrent", tc)):
            print(f"  {label:<13} register {r['register']:7.0f}/s   deregister {r['deregister']:7.0f}/s"
                  f"   (baseline GET /v1/status/leader {r['leader_get']:7.0f}/s; register costs "
                  f"{r['leader_get'] / r['register']:.1f}x a trivial request)")  # fmt: skip
    finally:
        if agent is not None:
            agent.stop()
        else:
            async with open_consul(config) as c:
                for n in range(ANCHORS + 1):
                    sid = FLIP_ID if n == ANCHORS else f"{SERVICE}-anchor-{n}"
                    await c.agent.service.deregister(sid)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consul", help="use this Consul instead of starting a dev agent")
    parser.add_argument("--changes", type=int, default=200, help="health changes per row")
    parser.add_argument("--watchers", default="1,100", help="comma-separated watcher counts")
    parser.add_argument("--poll-interval", type=float, default=0.1, help="baseline poll period (s)")
    parser.add_argument("--registrations", type=int, default=200)
    args = parser.parse_args()
    args.watchers = [int(n) for n in args.watchers.split(",")]
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
