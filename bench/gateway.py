"""Photo search through the mesh vs the same pipeline in one process: latency, throughput, shard count.

Run:  nice -n 10 python bench/gateway.py --home ~/.meshserve          # S = 1, 4, 8
      nice -n 10 python bench/gateway.py --quick                      # smoke run: fewer queries, S = 1, 4

One run, the same trained models and the same held-out photos on both sides:

(a) concurrency 1: p50 and p99 of `InProcessSearch.search` vs `PhotoSearch.Search` through a local
    mesh (dev registry, 2 detectors, 2 embedders, 4 shards on `up`'s indexer processes, gateway; every model
    server `--threads 1`; `--indexer-processes 0`: one indexer per shard).
    Goal (issue #19): mesh/in-process ≤ 1.3 at p50 and ≤ 1.5 at p99.
(b) throughput: 16 searches in flight through the mesh (grpc.aio, one channel) vs the in-process loop
    run sequentially over the same requests. Goal: mesh/in-process ≥ 1.3, thanks to dynamic batching
    and the replicas working on both cores at once; and CPU per search (every mesh process, from
    /proc) ≤ 1.5× the loop's. Beside it, how many requests each detector and embedder call merged
    (their meshserve_server_batch_requests histograms, scraped before and after the mesh's rounds).
(c) latency at concurrency 1 vs shard count S = 1, 4, 8: a fresh LocalMesh per S (shards rebuilt as
    S contiguous slices of the catalogue), with the in-process pipeline over the same S shards beside it.
(d) mTLS on vs off: a plaintext and an mTLS mesh up side by side, searched interleaved, and one empty
    hop to each of their processes (bench/helpers/gateway_tls.py). `--tls-only` runs just this part.

Every mesh request sets `no_cache=True`, so the gateway's prediction cache never answers. Both sides
are warmed up before timing. The two sides are measured *interleaved*, query by query, with the order
alternating, so the load that other work puts on this shared machine falls on both alike.

The in-process baseline's torch threads. The machine has 2 cores, shared. Each mesh stage runs in its
own process with 1 torch thread, and at concurrency 1 the stages run one after another, so a search
through the mesh computes on one core at a time; at concurrency 16 the replicas use both cores. The
in-process pipeline is measured at 1 and at 2 torch threads in the same run, and each goal is set
against whichever of the two is faster here (the stricter baseline), with the other ratio printed too:
  - 1 thread is the like-for-like baseline for latency: the same compute budget per stage as the servers,
    so the ratio isolates what the mesh adds (gRPC hops, (de)serialisation, the gateway, tracing). It is
    interleaved with the mesh query by query.
  - 2 threads is the "whole machine to one process" baseline that throughput must beat. On a busy shared
    box it can be far slower than 1 thread: an OpenMP parallel region waits at its barrier for a thread
    the scheduler has parked. Measured in a block of its own (resizing the OpenMP pool per call would
    cost it), so it is not interleaved.
The in-process throughput is the sequential loop's searches per second over the same requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from meshserve.local.cli import UP_INDEXER_PROCESSES
from meshserve.v1 import photo_search_pb2, photo_search_pb2_grpc

TOP_K = 10
# Goals of issue #19, as mesh / in-process ratios
P50_GOAL, P99_GOAL, THROUGHPUT_GOAL, CPU_GOAL = 1.3, 1.5, 1.3, 1.5
BATCHED_ROLES = ("detector", "embedder")
CONCURRENCY = 16
TIMEOUT_S = 60.0
BASELINE_THREADS = (1, 2)


@dataclass(frozen=True)
class BenchConfig:
    home: Path
    queries: int
    shard_counts: tuple[int, ...]
    main_shards: int
    min_score: float
    throughput_requests: int
    warmup: int
    trace_sample: float = 1.0  # share of searches traced (whole traces: parent-based sampling)
    ready_timeout_s: float = 300.0
    tls_only: bool = False
    indexer_processes: int = 0  # the shards dealt over this many indexer processes (0: one per shard)
    tls: bool = True  # run (d)

    def __post_init__(self) -> None:
        if self.queries < 2:
            raise ValueError("--queries must be at least 2")
        if not 0.0 <= self.trace_sample <= 1.0:
            raise ValueError("--trace-sample must be within [0, 1]")
        if self.main_shards not in self.shard_counts:
            raise ValueError(f"the main shard count {self.main_shards} must be one of {self.shard_counts}")


@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        ordered = sorted(self.seconds)
        # nearest-rank percentile: with few samples p99 is the slowest search, never an interpolation
        rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
        return ordered[rank - 1]

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p99(self) -> float:
        return self.pct(99)


# -- the two sides ------------------------------------------------------------------------------


def free_port() -> int:
    """A free port below the kernel's ephemeral range.

    The mesh binds its gateway and registry to ports chosen here, minutes later once the model
    servers are up; those servers bind port 0, and an ephemeral port could be handed to one of
    them (or to anyone on this shared machine) meanwhile. Ports below the range never are.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


STAGES = ("validate", "detect", "embed", "search", "merge", "enrich")


def stage_totals(metrics_port: int) -> dict[str, tuple[float, float]]:
    """The gateway's per-stage (sum of seconds, count) from its Prometheus /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    totals: dict[str, list[float]] = {stage: [0.0, 0.0] for stage in STAGES}
    for line in text.splitlines():
        for stage in STAGES:
            for suffix, slot in (("_sum", 0), ("_count", 1)):
                prefix = f'meshserve_gateway_stage_seconds{suffix}{{stage="{stage}"}} '
                if line.startswith(prefix):
                    totals[stage][slot] = float(line[len(prefix):])
    return {stage: (v[0], v[1]) for stage, v in totals.items()}


def stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean seconds per stage between two scrapes (stages that did not run are left out)."""
    out = {}
    for stage in STAGES:
        seconds, count = after[stage][0] - before[stage][0], after[stage][1] - before[stage][1]
        if count > 0:
            out[stage] = seconds / count
    return out


def search_request(image: bytes, min_score: float) -> photo_search_pb2.SearchRequest:
    return photo_search_pb2.SearchRequest(image=image, top_k=TOP_K, min_detection_score=min_score, no_cache=True)


class InProcess:
    """The reference pipeline in this process, with the torch thread count set per call."""

    def __init__(self, home: Path, shard_dirs: Sequence[Path], min_score: float):
        from meshserve.inference.artifacts import latest
        from meshserve.local.inprocess import InProcessSearch

        detector, embedder = latest("detector", home), latest("embedder", home)
        assert detector is not None and embedder is not None
        self.pipeline = InProcessSearch(detector, embedder, shard_dirs)
        self.min_score = min_score

    def threads(self, n: int) -> None:
        import torch

        torch.set_num_threads(n)

    def search(self, image: bytes) -> int:
        return len(self.pipeline.search(image, TOP_K, self.min_score))


class ThroughMesh:
    """Synchronous searches through the gateway over one persistent channel."""

    def __init__(self, target: str, min_score: float, shards: int):
        self.channel = grpc.insecure_channel(target)
        self.stub = photo_search_pb2_grpc.PhotoSearchStub(self.channel)
        self.min_score = min_score
        self.shards = shards

    def search(self, image: bytes) -> int:
        reply = self.stub.Search(search_request(image, self.min_score), timeout=TIMEOUT_S)
        if reply.coverage.shards_answered != self.shards or reply.coverage.shards_expected != self.shards:
            raise RuntimeError(f"coverage {reply.coverage.shards_answered}/{reply.coverage.shards_expected}, "
                               f"expected {self.shards}/{self.shards}: the figures would not be comparable")
        return len(reply.detections)

    def close(self) -> None:
        self.channel.close()


def empty_rpc(targets: Sequence[str], rounds: int) -> Timings:
    """Round trips of grpc.health.v1 Check (no work at all) to the mesh's processes: the price of one hop."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channels = [grpc.insecure_channel(t) for t in targets]
    try:
        stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
        for stub in stubs:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        out = Timings()
        for _ in range(rounds):
            for stub in stubs:
                started = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
                out.seconds.append(time.perf_counter() - started)
        return out
    finally:
        for channel in channels:
            channel.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass
class BatchCounts:
    """One role's meshserve_server_batch_requests, summed over its replicas."""

    cumulative: dict[float, float] = field(default_factory=dict)  # upper bound → model calls
    requests: float = 0.0
    calls: float = 0.0


def batch_requests(registry: str) -> dict[str, BatchCounts]:
    """Per role in BATCHED_ROLES, how many requests its model calls merged so far (every replica,
    found with its metrics_port in the registry)."""
    import json

    from meshserve.local.top import buckets, parse_samples, total
    from meshserve.registry.config import METRICS_PORT_META, SERVICE_NAMES

    out: dict[str, BatchCounts] = {}
    for role in BATCHED_ROLES:
        with urllib.request.urlopen(f"{registry}/v1/catalog/service/{SERVICE_NAMES[role]}", timeout=10) as resp:
            entries = json.load(resp)
        counts = out[role] = BatchCounts()
        for entry in entries:
            host = entry.get("ServiceAddress") or entry.get("Address") or "127.0.0.1"
            port = (entry.get("ServiceMeta") or {}).get(METRICS_PORT_META)
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
                samples = parse_samples(resp.read().decode())
            for bound, count in buckets(samples, "meshserve_server_batch_requests").items():
                counts.cumulative[bound] = counts.cumulative.get(bound, 0.0) + count
            counts.requests += total(samples, "meshserve_server_batch_requests_sum")
            counts.calls += total(samples, "meshserve_server_batch_requests_count")
    return out


def histogram_lines(before: dict[str, BatchCounts], after: dict[str, BatchCounts]) -> list[str]:
    """Model calls by requests merged per call between two scrapes, one line per role."""
    lines = []
    for role in BATCHED_ROLES:
        now, then = after[role], before[role]
        parts, lower, below = [], 0.0, 0.0
        for bound in sorted(now.cumulative):
            cumulative = now.cumulative[bound] - then.cumulative.get(bound, 0.0)
            if cumulative > below and bound != float("inf"):
                label = f"{int(bound)}" if bound - lower <= 1 else f"{int(lower) + 1}–{int(bound)}"
                parts.append(f"{label}: {int(cumulative - below)}")
            lower, below = bound, cumulative
        calls, requests = now.calls - then.calls, now.requests - then.requests
        mean = f"; {requests / calls:.2f} requests per call" if calls else ""
        lines.append(f"  {role:<9} model calls by requests merged: {', '.join(parts) or 'none'}{mean}")
    return lines


def role_of(name: str) -> str:
    return name.split("-", 1)[0]


def mesh_cpu(children: Sequence[tuple[str, int]]) -> dict[str, float]:
    """CPU seconds so far per role of the mesh's processes, plus this (client) process."""
    out: dict[str, float] = {"client (bench)": time.process_time()}
    for name, pid in children:
        out[role_of(name)] = out.get(role_of(name), 0.0) + cpu_seconds(pid)
    return out


def timed(fn: Callable[[bytes], int], image: bytes) -> float:
    started = time.perf_counter()
    fn(image)
    return time.perf_counter() - started


def interleaved(sides: dict[str, Callable[[bytes], int]], photos: Sequence[bytes], warmup: int) -> dict[str, Timings]:
    """Each photo searched by every side in turn, the order rotating per photo; warm-up untimed."""
    names = list(sides)
    for photo in list(photos)[:warmup]:
        for name in names:
            sides[name](photo)
    out = {name: Timings() for name in names}
    for i, photo in enumerate(photos):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].seconds.append(timed(sides[name], photo))
    return out


async def _mesh_concurrent(target: str, requests: Sequence[bytes], min_score: float, concurrency: int) -> float:
    """Wall seconds for all `requests` with `concurrency` in flight over one grpc.aio channel."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = photo_search_pb2_grpc.PhotoSearchStub(channel)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for image in requests:
            queue.put_nowait(image)

        async def worker() -> None:
            while not queue.empty():
                image = queue.get_nowait()
                await stub.Search(search_request(image, min_score), timeout=TIMEOUT_S)

        warm = [stub.Search(search_request(image, min_score), timeout=TIMEOUT_S) for image in requests[:concurrency]]
        await asyncio.gather(*warm)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def mesh_throughput(target: str, requests: Sequence[bytes], min_score: float) -> float:
    return len(requests) / asyncio.run(_mesh_concurrent(target, requests, min_score, CONCURRENCY))


def inprocess_throughput(side: InProcess, threads: int, requests: Sequence[bytes]) -> float:
    side.threads(threads)
    side.search(requests[0])
    started = time.perf_counter()
    for image in requests:
        side.search(image)
    return len(requests) / (time.perf_counter() - started)


# -- one mesh per shard count -------------------------------------------------------------------


@dataclass
class ShardRow:
    shards: int
    mesh: Timings
    inproc: Timings


@dataclass
class MainFigures:
    latency: dict[str, Timings]
    throughput: dict[str, list[float]]  # side -> one figure per round
    stages: dict[str, float]  # gateway stage -> mean seconds during (a)
    hop: Timings  # empty gRPC round trips to the gateway and model servers
    cpu_ms: dict[str, float]  # CPU ms per search during (b): mesh per role, and the in-process loop
    batches: list[str]  # requests merged per detector / embedder call during (b)


def run_mesh(cfg: BenchConfig, shards: int, photos: Sequence[bytes], say: Callable[[str], None]
             ) -> tuple[ShardRow, MainFigures | None]:  # fmt: skip
    from meshserve.local.mesh import LocalMesh, MeshConfig

    mesh_cfg = MeshConfig(home=cfg.home, registry_addr=f"127.0.0.1:{free_port()}",
                          gateway_addr=f"127.0.0.1:{free_port()}", shards=shards, threads=1,
                          indexer_processes=cfg.indexer_processes,
                          gateway_metrics_port=free_port(), ready_timeout_s=cfg.ready_timeout_s)  # fmt: skip
    mesh = LocalMesh(mesh_cfg, say=lambda line: say(f"  mesh: {line}"))
    client: ThroughMesh | None = None
    try:
        started = time.monotonic()
        info = mesh.start()
        say(f"mesh with S={shards} up in {time.monotonic() - started:.0f}s "
            f"({sum(1 for e in info.endpoints)} processes besides the registry)")
        shard_dirs = [mesh_cfg.run_dir / "shards" / _embedder_version(cfg.home) / f"base-{i}" for i in range(shards)]
        inproc = InProcess(cfg.home, shard_dirs, cfg.min_score)
        client = ThroughMesh(info.gateway, cfg.min_score, shards)
        main = shards == cfg.main_shards
        if not main:
            got = interleaved({"mesh": client.search, "inproc-1": inproc.search}, photos, cfg.warmup)
            return ShardRow(shards, got["mesh"], got["inproc-1"]), None

        say(f"(a) concurrency 1: {len(photos)} photos, mesh and in-process (1 thread) interleaved …")
        assert mesh_cfg.gateway_metrics_port is not None
        scraped = stage_totals(mesh_cfg.gateway_metrics_port)
        latency = interleaved({"mesh": client.search, "inproc-1": inproc.search}, photos, cfg.warmup)
        stages = stage_means(scraped, stage_totals(mesh_cfg.gateway_metrics_port))
        # 2 threads in a block of its own: switching the OpenMP pool's size every call would cost it
        say("(a) … and in-process at 2 torch threads")
        inproc.threads(2)
        latency["inproc-2"] = interleaved({"inproc-2": inproc.search}, photos, cfg.warmup)["inproc-2"]
        inproc.threads(1)
        hop_targets = [e.target for e in info.endpoints if e.role in ("gateway", "detector", "embedder", "indexer")]
        hop = empty_rpc(hop_targets, rounds=max(5, len(photos) // len(hop_targets)))

        requests = [photos[i % len(photos)] for i in range(cfg.throughput_requests)]
        say(f"(b) throughput: {len(requests)} searches, {CONCURRENCY} in flight vs the sequential loop, 2 rounds …")
        throughput: dict[str, list[float]] = {"mesh": [], **{f"inproc-{n}": [] for n in BASELINE_THREADS}}
        children = [(c.spec.name, c.proc.pid) for c in mesh.supervisor.children if c.alive]
        cpu: dict[str, float] = {}
        batches_before = batch_requests(info.registry)
        for _ in range(2):  # alternate rounds so a burst of outside load does not land on one side only
            for n in BASELINE_THREADS:
                started_cpu = time.process_time()
                throughput[f"inproc-{n}"].append(inprocess_throughput(inproc, n, requests))
                if n == 1:
                    cpu["in-process loop (1 thread)"] = cpu.get("in-process loop (1 thread)", 0.0) + (
                        time.process_time() - started_cpu)
            cpu_before = mesh_cpu(children)
            throughput["mesh"].append(mesh_throughput(info.gateway, requests, cfg.min_score))
            for role, seconds in mesh_cpu(children).items():
                cpu[f"mesh {role}"] = cpu.get(f"mesh {role}", 0.0) + seconds - cpu_before[role]
        # per search: each round runs len(requests) searches plus its warm-up (1 on the loop, 16 on the mesh)
        cpu_ms = {k: 1000 * v / (2 * (len(requests) + (CONCURRENCY if k.startswith("mesh ") else 1)))
                  for k, v in cpu.items()}  # fmt: skip
        inproc.threads(1)
        batches = histogram_lines(batches_before, batch_requests(info.registry))
        figures = MainFigures(latency, throughput, stages, hop, cpu_ms, batches)
        return ShardRow(shards, latency["mesh"], latency["inproc-1"]), figures
    finally:
        if client is not None:
            client.close()
        mesh.stop()
        alive = [c.spec.name for c in mesh.supervisor.children if c.alive]
        if alive:
            say(f"WARNING: still alive after stop: {alive}")


def _embedder_version(home: Path) -> str:
    from meshserve.inference.artifacts import latest

    embedder = latest("embedder", home)
    assert embedder is not None
    return embedder.name


# -- report -------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{1000 * seconds:8.1f}"


def verdict(ok: bool) -> str:
    return "meets goal" if ok else "MISSES goal"


def report(cfg: BenchConfig, main: MainFigures, rows: list[ShardRow], n_photos: int) -> str:
    lat, thr = main.latency, main.throughput
    mesh = lat["mesh"]
    base_name = min(("inproc-1", "inproc-2"), key=lambda n: lat[n].p50)
    base = lat[base_name]
    p50_ratio, p99_ratio = mesh.p50 / base.p50, mesh.p99 / base.p99
    lines = [
        "",
        f"photo search, {n_photos} held-out photos, top_k {TOP_K}, min score {cfg.min_score}, "
        f"S={cfg.main_shards} for (a) and (b), "
        + (f"shards on {cfg.indexer_processes} indexer process(es), " if cfg.indexer_processes
           else "one indexer per shard, ")
        + "no_cache on every mesh request, "
        + ("every search traced" if cfg.trace_sample >= 1.0 else
           f"{100 * cfg.trace_sample:g}% of searches traced (whole traces)"),
        "",
        "(a) latency at concurrency 1 (ms)",
        f"{'side':<36} {'p50':>8} {'p99':>8} {'mean':>8}",
    ]
    labels = {"mesh": "mesh (model servers --threads 1)", "inproc-1": "in-process, 1 torch thread",
              "inproc-2": "in-process, 2 torch threads"}  # fmt: skip
    for name, t in lat.items():
        lines.append(f"{labels[name]:<36} {ms(t.p50)} {ms(t.p99)} {ms(statistics.fmean(t.seconds))}")
    lines += [
        f"ratio mesh / {labels[base_name]} (the faster in-process): "
        f"p50 {p50_ratio:.2f} (goal ≤ {P50_GOAL}, {verdict(p50_ratio <= P50_GOAL)}), "
        f"p99 {p99_ratio:.2f} (goal ≤ {P99_GOAL}, {verdict(p99_ratio <= P99_GOAL)})",
    ]
    for name in ("inproc-1", "inproc-2"):
        if name != base_name:
            lines.append(f"ratio mesh / {labels[name]}: p50 {mesh.p50 / lat[name].p50:.2f}, "
                         f"p99 {mesh.p99 / lat[name].p99:.2f}")  # fmt: skip
    lines += [
        f"mesh overhead at p50: {1000 * (mesh.p50 - lat['inproc-1'].p50):+.1f} ms per search over the interleaved "
        "1-thread in-process run",
        "inside the gateway, mean ms per stage (warm-up included): "
        + ", ".join(f"{stage} {1000 * sec:.1f}" for stage, sec in main.stages.items())
        + f"; total {1000 * sum(main.stages.values()):.1f}",
        f"an empty gRPC round trip (health Check) to a mesh process right after: p50 {1000 * main.hop.p50:.1f} ms, "
        f"p99 {1000 * main.hop.p99:.1f} ms; a search makes 4 such hops one after another "
        "(client→gateway→detector, →embedder, →shards)",
        "",
        f"(b) throughput (searches/s; best of {len(thr['mesh'])} alternating rounds, every round shown)",
    ]
    best = {name: max(v) for name, v in thr.items()}
    mesh_cpu_ms = sum(v for k, v in main.cpu_ms.items() if k.startswith("mesh ") and not k.startswith("mesh client"))
    cpu_ratio = mesh_cpu_ms / max(main.cpu_ms.get("in-process loop (1 thread)", 0.0), 1e-9)
    thr_labels = {"mesh": f"mesh, {CONCURRENCY} in flight", "inproc-1": "in-process loop, 1 torch thread",
                  "inproc-2": "in-process loop, 2 torch threads"}  # fmt: skip
    for name, values in thr.items():
        rounds = "  ".join(f"{v:6.1f}" for v in values)
        lines.append(f"{thr_labels[name]:<36} {best[name]:8.1f}   rounds: {rounds}")
    thr_base = max(("inproc-1", "inproc-2"), key=lambda n: best[n])
    other = "inproc-2" if thr_base == "inproc-1" else "inproc-1"
    ratio = best["mesh"] / best[thr_base]
    lines += [
        f"ratio mesh / {thr_labels[thr_base]} (the faster loop): {ratio:.2f} "
        f"(goal ≥ {THROUGHPUT_GOAL}, {verdict(ratio >= THROUGHPUT_GOAL)}); "
        f"vs the {thr_labels[other].removeprefix('in-process loop, ')} loop: {best['mesh'] / best[other]:.2f}",
        "CPU ms per search during (b): in-process loop (1 thread) "
        f"{main.cpu_ms.get('in-process loop (1 thread)', 0.0):.1f}; mesh "
        f"{sum(v for k, v in main.cpu_ms.items() if k.startswith('mesh ')):.1f} = "
        + ", ".join(f"{k.removeprefix('mesh ')} {v:.1f}" for k, v in sorted(main.cpu_ms.items(), key=lambda kv: -kv[1])
                    if k.startswith("mesh ") and v >= 0.05),
        f"CPU per search, mesh processes (the bench client left out) / the in-process loop: {cpu_ratio:.2f} "
        f"(goal ≤ {CPU_GOAL}, {verdict(cpu_ratio <= CPU_GOAL)})",
        f"requests merged per model call during the mesh's rounds of (b), {CONCURRENCY} in flight:",
        *main.batches,
        "",
        "(c) latency at concurrency 1 vs shard count (ms; in-process at 1 torch thread over the same shards)",
        f"{'S':>3} {'mesh p50':>9} {'mesh p99':>9} {'inproc p50':>11} {'inproc p99':>11} {'p50 ratio':>10} "
        f"{'p99 ratio':>10}",
    ]
    for row in sorted(rows, key=lambda r: r.shards):
        lines.append(f"{row.shards:>3} {ms(row.mesh.p50):>9} {ms(row.mesh.p99):>9} {ms(row.inproc.p50):>11} "
                     f"{ms(row.inproc.p99):>11} {row.mesh.p50 / row.inproc.p50:>10.2f} "
                     f"{row.mesh.p99 / row.inproc.p99:>10.2f}")  # fmt: skip
    return "\n".join(lines)


def add_search_arguments(parser: argparse.ArgumentParser, quick_queries: int) -> None:
    """--home, --queries and --min-score, as every photo-search bench takes them."""
    parser.add_argument("--home", type=Path, default=os.environ.get("MESHSERVE_HOME"),
                        help="MESHSERVE_HOME with trained models (default $MESHSERVE_HOME)")  # fmt: skip
    parser.add_argument("--queries", type=int, default=None,
                        help=f"held-out photos timed per side (default 60, {quick_queries} with --quick)")  # fmt: skip
    parser.add_argument("--min-score", type=float, default=0.3,
                        help="min detection score on both sides (default 0.3, the gateway's default)")  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(parser, quick_queries=12)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer queries, S = 1, 4 only")
    parser.add_argument("--tls-only", action="store_true", help="run only (d), mTLS on vs off")
    parser.add_argument("--trace-sample", type=float, default=1.0,
                        help="share of searches the mesh traces (default 1: every one, as `meshserve up`); "
                             "below 1 every process samples parent-based (OTEL_TRACES_SAMPLER="
                             "parentbased_traceidratio), so a search is traced whole or not at all")  # fmt: skip
    parser.add_argument("--indexer-processes", type=int, default=UP_INDEXER_PROCESSES, metavar="N",
                        help=f"indexer processes each mesh deals its shards over, as `meshserve up` does (default "
                             f"{UP_INDEXER_PROCESSES}, up's; 0: one per shard)")  # fmt: skip
    parser.add_argument("--shards", help="comma-separated shard counts S to run, e.g. 4,8 (default 1,4,8; "
                                         "1,4 with --quick); (a) and (b) run at S=4 when listed, else the first")
    parser.add_argument("--no-tls", action="store_true", help="skip (d), mTLS on vs off")
    args = parser.parse_args(argv)
    if args.home is None:
        parser.error("no models: pass --home DIR or set MESHSERVE_HOME")
    queries = args.queries or (12 if args.quick else 60)
    shard_counts: tuple[int, ...] = (1, 4) if args.quick else (1, 4, 8)
    if args.shards:
        shard_counts = tuple(int(n) for n in args.shards.split(","))
    return BenchConfig(
        home=Path(args.home).expanduser().resolve(),
        queries=queries,
        shard_counts=shard_counts,
        main_shards=4 if 4 in shard_counts else shard_counts[0],
        min_score=args.min_score,
        throughput_requests=max(2 * CONCURRENCY, 2 * queries),
        warmup=min(queries, 4 if args.quick else 8),
        tls_only=args.tls_only,
        trace_sample=args.trace_sample,
        indexer_processes=args.indexer_processes,
        tls=not args.no_tls,
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    from meshserve.inference.artifacts import latest
    from meshserve.local.demo import held_out_photos

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    missing = [k for k in ("detector", "embedder", "classifier", "shipping") if latest(k, cfg.home) is None]
    if missing:
        raise SystemExit(f"{cfg.home} has no trained {', '.join(missing)}: run `meshserve train --quick` first")
    import torch

    torch.set_num_threads(1)
    if cfg.trace_sample < 1.0:  # the mesh's processes inherit this environment (OTel's standard variables)
        os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        os.environ["OTEL_TRACES_SAMPLER_ARG"] = str(cfg.trace_sample)
    photos = [p.jpeg for p in held_out_photos(cfg.home, cfg.queries)]
    from helpers.gateway_tls import Tools, tls_on_off  # bench/helpers/, beside this script

    tools = Tools(free_port, interleaved, search_request, TIMEOUT_S)
    if cfg.tls_only:
        print("\n".join(tls_on_off(cfg.home, photos, cfg.min_score, cfg.warmup, cfg.ready_timeout_s, say, tools)))
        return 0
    rows: list[ShardRow] = []
    main_figures: MainFigures | None = None
    # the main mesh first, the others after: its shard dirs are rebuilt when S changes
    for shards in sorted(cfg.shard_counts, key=lambda s: (s != cfg.main_shards, s)):
        say(f"starting a mesh with S={shards} over {cfg.home} …")
        row, figures = run_mesh(cfg, shards, photos, say)
        rows.append(row)
        main_figures = figures or main_figures
        say(f"S={shards}: mesh p50 {1000 * row.mesh.p50:.1f} ms, in-process p50 {1000 * row.inproc.p50:.1f} ms")
    assert main_figures is not None
    tls_lines: list[str] = []
    if cfg.tls:
        tls_lines = tls_on_off(cfg.home, photos, cfg.min_score, cfg.warmup, cfg.ready_timeout_s, say, tools)
    print(report(cfg, main_figures, rows, len(photos)) + "\n" + "\n".join(tls_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
