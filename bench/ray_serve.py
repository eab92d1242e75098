"""Photo search through the mesh vs the same models, photos and shards as a Ray Serve deployment graph, in one run.

Run:  pip install -e '.[bench]'                                        # Ray Serve, into the bench venv only
      MESHSERVE_HOME=~/.meshserve meshserve train --quick              # once: the quick models (no downloads)
      nice -n 10 python bench/ray_serve.py --home ~/.meshserve         # 60 photos, S = 4
      nice -n 10 python bench/ray_serve.py --home ~/.meshserve --quick # 20 photos: a few minutes
      … --ray-throughput-optimized                                     # Ray Serve in its high-throughput mode

One run, two sides over the same trained models, the same held-out photos, the same top_k and min score:

  mesh  a local mesh started as bench/gateway.py starts it (dev registry, 2 detectors, 2 embedders, S indexers,
        the gateway; model servers `--threads 1`), searched through the gateway with `no_cache`.
  Ray   a local Ray cluster (`ray.init(num_cpus=2)`, no dashboard, no HTTP proxy) running the deployment graph of
        bench/helpers/ray_graph.py: 2 detector and 2 embedder replicas (batched by `serve.batch`, up to 8 per model
        call, no waiting, as the mesh's servers batch), one replica per shard loading the very hnswlib shard
        directories the mesh's indexers serve, and an ingress composing them through DeploymentHandles; torch on 1
        thread per replica; Serve's access log off. Called through a DeploymentHandle from this process.

First a few photos go through both sides and their top results are compared (same detections, same item ids,
same scores), so the figures compare the same work. Then:
(a) latency at concurrency 1: p50 and p99, the two sides interleaved photo by photo with the order alternating;
(b) throughput with 16 searches in flight (grpc.aio on one channel; handle calls on one event loop), two rounds
    per side alternating, and CPU per search from /proc: every mesh process, and every process of the Ray
    cluster (replicas by deployment, the rest of Ray — raylet, GCS, Serve controller, agents — as "ray system").
Measuring both sides in the same run, alternating, lets the load other work puts on this shared machine fall on
both alike; each side is idle (but up) while the other is measured.
Goals (issue #19), as mesh / Ray: throughput ≥ 2, p50 ≤ 0.6, p99 ≤ 0.7.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import gateway_bench  # bench/helpers/, beside this script

THROUGHPUT_GOAL, P50_GOAL, P99_GOAL = 2.0, 0.6, 0.7  # issue #19, mesh / Ray
RAY_CPUS = 2
SCORE_TOLERANCE = 1e-4  # float32 scores through protobuf vs through Ray's pickles

bg = gateway_bench.load()  # bench/gateway.py: ports, timings, the mesh client, arguments


@dataclass(frozen=True)
class RayBenchConfig:
    home: Path
    queries: int
    shards: int
    min_score: float
    throughput_requests: int
    warmup: int
    agreement_photos: int
    ray_throughput_optimized: bool = False  # Ray Serve's documented high-throughput mode (Ray ≥ 2.55)
    indexer_processes: int = 0  # the mesh's shards dealt over this many indexer processes (0: one per shard)
    ready_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.queries < 2:
            raise ValueError("--queries must be at least 2")
        if self.shards < 1:
            raise ValueError("--shards must be at least 1")


# -- the Ray side -------------------------------------------------------------------------------


class RayCluster:
    """A local Ray cluster with the photo search graph deployed, and how long each part took to come up."""

    def __init__(self, cfg: RayBenchConfig, shard_dirs: Sequence[Path]):
        import ray
        from helpers.ray_graph import photo_search_app  # bench/helpers/, beside this script
        from ray import serve

        from meshserve.inference.artifacts import latest

        detector, embedder = latest("detector", cfg.home), latest("embedder", cfg.home)
        assert detector is not None and embedder is not None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a benchmark
        started = time.monotonic()
        for attempt in (1, 2):
            try:
                ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
                         object_store_memory=128 * 2**20)  # fmt: skip
                break
            except Exception:  # ray.init gives up after 30 s when its raylet registers slowly (seen on 2 busy cores)
                ray.shutdown()
                if attempt == 2:
                    raise
        self.cluster_s = time.monotonic() - started
        started = time.monotonic()
        try:
            serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
            app = photo_search_app(detector, embedder, shard_dirs, detectors=2, embedders=2)
            self.handle = serve.run(app, name="photo-search", route_prefix=None)
        except BaseException:
            ray.shutdown()
            raise
        self.deploy_s = time.monotonic() - started
        # every handle call from this one loop: in Ray Serve's throughput mode a handle routes requests on the
        # loop that calls it and cannot be called from outside a loop
        self.loop = asyncio.new_event_loop()

    def stop(self) -> None:
        """Ray stopped with everything it runs; no graceful Serve shutdown (in throughput mode its controller
        waits out a 30 s timeout for the handle's router, which lives on this loop)."""
        import ray

        try:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.wait(pending))
        finally:
            self.loop.close()
            ray.shutdown()


class ThroughRay:
    """Searches through the ingress's DeploymentHandle, on the cluster's event loop."""

    def __init__(self, cluster: RayCluster, min_score: float):
        self.handle, self.loop = cluster.handle, cluster.loop
        self.min_score = min_score

    async def _answer(self, image: bytes) -> list[Any]:
        return list(await self.handle.remote(image, bg.TOP_K, self.min_score))

    def answer(self, image: bytes) -> list[Any]:
        return self.loop.run_until_complete(asyncio.wait_for(self._answer(image), bg.TIMEOUT_S))

    def search(self, image: bytes) -> int:
        return len(self.answer(image))

    def throughput(self, requests: Sequence[bytes]) -> float:
        """Searches per second with CONCURRENCY in flight (as bench/gateway.py's mesh run)."""
        return len(requests) / self.loop.run_until_complete(self._concurrent(requests, bg.CONCURRENCY))

    async def _concurrent(self, requests: Sequence[bytes], concurrency: int) -> float:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for image in requests:
            queue.put_nowait(image)

        async def worker() -> None:
            while not queue.empty():
                await self._answer(queue.get_nowait())

        await asyncio.gather(*(self._answer(image) for image in requests[:concurrency]))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


# -- CPU from /proc -----------------------------------------------------------------------------


def _children_by_parent() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def _descendants(root: int, children: dict[int, list[int]], skip: set[int]) -> list[int]:
    found, stack = [], [root]
    while stack:
        for pid in children.get(stack.pop(), []):
            if pid not in skip:
                found.append(pid)
                stack.append(pid)
    return found


RAY_ROLES = {"DetectorReplica": "detector", "EmbedderReplica": "embedder", "ShardReplica": "shards",
             "PhotoSearchIngress": "ingress"}  # fmt: skip


def ray_role(pid: int) -> str:
    """A Ray process's role from its title (`ray::ServeReplica:<app>:<deployment>` for a replica)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "ray system"
    if title.startswith("ray::ServeReplica:"):
        deployment = title.rsplit(":", 1)[1].split("-", 1)[0].split()[0]
        return RAY_ROLES.get(deployment, deployment)
    return "ray system"


def ray_pids(mesh_pids: set[int]) -> list[int]:
    """Every process the Ray cluster runs: this process's descendants that are not the mesh's."""
    return _descendants(os.getpid(), _children_by_parent(), mesh_pids)


def ray_cpu(mesh_pids: set[int]) -> dict[str, float]:
    """CPU seconds so far per role of the Ray cluster's processes, plus this (client) process."""
    out: dict[str, float] = {"client (bench)": time.process_time()}
    for pid in ray_pids(mesh_pids):
        role = ray_role(pid)
        out[role] = out.get(role, 0.0) + bg.cpu_seconds(pid)
    return out


def resident_mb(pids: Sequence[int]) -> float:
    """Resident memory of these processes together (pages they share are counted once per process)."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Agreement:
    photos: int = 0
    detections: tuple[int, int] = (0, 0)  # mesh, Ray
    same_label: int = 0
    same_top1: int = 0
    shared_ids: int = 0
    compared_ids: int = 0
    max_score_diff: float = 0.0

    @property
    def whole(self) -> bool:
        return (self.detections[0] == self.detections[1] == self.same_label == self.same_top1
                and self.shared_ids == self.compared_ids and self.max_score_diff <= SCORE_TOLERANCE)  # fmt: skip


def agreement(mesh: Any, ray_side: ThroughRay, photos: Sequence[bytes], min_score: float) -> Agreement:
    """Both sides' answers for the same photos, detection by detection (each side lists them best first)."""
    out = Agreement()
    for image in photos:
        reply = mesh.stub.Search(bg.search_request(image, min_score), timeout=bg.TIMEOUT_S)
        theirs = ray_side.answer(image)
        out.photos += 1
        out.detections = (out.detections[0] + len(reply.detections), out.detections[1] + len(theirs))
        for ours, (label, _score, _box, matches) in zip(reply.detections, theirs, strict=False):
            out.same_label += ours.label == label
            our_ids = [m.item_id for m in ours.matches]
            their_ids = [item for item, _ in matches]
            out.same_top1 += bool(our_ids and their_ids and our_ids[0] == their_ids[0])
            out.shared_ids += len(set(our_ids) & set(their_ids))
            out.compared_ids += max(len(our_ids), len(their_ids))
            theirs_by_id = dict(matches)
            for m in ours.matches:
                if m.item_id in theirs_by_id:
                    out.max_score_diff = max(out.max_score_diff, abs(m.score - theirs_by_id[m.item_id]))
    return out


@dataclass
class Figures:
    latency: dict[str, Any]  # side -> bench/gateway.py Timings
    throughput: dict[str, list[float]]  # side -> searches/s per round
    cpu_ms: dict[str, dict[str, float]]  # side -> role -> CPU ms per search during (b)
    agreement: Agreement
    startup_s: dict[str, float]
    idle_cores: dict[str, float]  # side -> cores its processes kept busy while nobody searched
    resident_mb: dict[str, float]  # side -> resident memory of its processes after the run
    processes: dict[str, int]  # side -> how many processes it runs


IDLE_S = 5.0  # how long both sides are watched doing nothing


def idle_cores(probes: dict[str, Callable[[], dict[str, float]]]) -> dict[str, float]:
    """Cores each side's processes keep busy while up and unused (health checks, heartbeats, controllers)."""
    before = {side: probe() for side, probe in probes.items()}
    time.sleep(IDLE_S)
    return {side: (_cpu_total(probe()) - _cpu_total(before[side])) / IDLE_S for side, probe in probes.items()}


def _per_search(before: dict[str, float], after: dict[str, float], searches: int) -> dict[str, float]:
    return {role: 1000 * (after[role] - before.get(role, 0.0)) / searches for role in after}


def run(cfg: RayBenchConfig, photos: Sequence[bytes], say: Callable[[str], None]) -> Figures:
    from meshserve.local.mesh import LocalMesh, MeshConfig

    mesh_cfg = MeshConfig(home=cfg.home, registry_addr=f"127.0.0.1:{bg.free_port()}",
                          gateway_addr=f"127.0.0.1:{bg.free_port()}", shards=cfg.shards, threads=1,
                          indexer_processes=cfg.indexer_processes,
                          gateway_metrics_port=bg.free_port(), ready_timeout_s=cfg.ready_timeout_s)  # fmt: skip
    mesh = LocalMesh(mesh_cfg, say=lambda line: say(f"  mesh: {line}"))
    client = cluster = None
    startup: dict[str, float] = {}
    try:
        started = time.monotonic()
        info = mesh.start()
        startup["mesh (registry, models, shards, gateway)"] = time.monotonic() - started
        say(f"mesh with S={cfg.shards} up in {startup['mesh (registry, models, shards, gateway)']:.0f}s")
        client = bg.ThroughMesh(info.gateway, cfg.min_score, cfg.shards)
        mesh_children = [(c.spec.name, c.proc.pid) for c in mesh.supervisor.children if c.alive]
        mesh_pids = {pid for _, pid in mesh_children}
        shard_dirs = [mesh_cfg.run_dir / "shards" / bg._embedder_version(cfg.home) / f"base-{i}"
                      for i in range(cfg.shards)]  # fmt: skip
        say(f"starting a local Ray cluster ({RAY_CPUS} CPUs) and the Serve graph over the mesh's {cfg.shards} shards …")
        cluster = RayCluster(cfg, shard_dirs)
        startup["Ray cluster (ray.init)"] = cluster.cluster_s
        startup["Serve graph deployed (serve.run)"] = cluster.deploy_s
        say(f"Ray up in {cluster.cluster_s:.0f}s, graph deployed in {cluster.deploy_s:.0f}s")
        ray_side = ThroughRay(cluster, cfg.min_score)

        probes: dict[str, Callable[[], dict[str, float]]] = {
            "mesh": lambda: bg.mesh_cpu(mesh_children), "ray": lambda: ray_cpu(mesh_pids)}
        agreed = agreement(client, ray_side, photos[: cfg.agreement_photos], cfg.min_score)
        say(f"agreement over {agreed.photos} photos: {'same results' if agreed.whole else 'RESULTS DIFFER'}")
        idle = idle_cores(probes)

        say(f"(a) concurrency 1: {len(photos)} photos, mesh and Ray interleaved …")
        latency = bg.interleaved({"mesh": client.search, "ray": ray_side.search}, photos, cfg.warmup)

        requests = [photos[i % len(photos)] for i in range(cfg.throughput_requests)]
        say(f"(b) throughput: {len(requests)} searches, {bg.CONCURRENCY} in flight, 2 rounds per side alternating …")
        throughput: dict[str, list[float]] = {"mesh": [], "ray": []}
        cpu: dict[str, dict[str, float]] = {"mesh": {}, "ray": {}}
        searches: dict[str, Callable[[], float]] = {
            "mesh": lambda: bg.mesh_throughput(info.gateway, requests, cfg.min_score),
            "ray": lambda: ray_side.throughput(requests)}
        for order in (("mesh", "ray"), ("ray", "mesh")):
            for side in order:
                before = probes[side]()
                throughput[side].append(searches[side]())
                # each round runs its requests plus one warm-up search per slot in flight
                for role, value in _per_search(before, probes[side](), len(requests) + bg.CONCURRENCY).items():
                    cpu[side][role] = cpu[side].get(role, 0.0) + value / 2
        pids = {"mesh": sorted(mesh_pids), "ray": ray_pids(mesh_pids)}
        return Figures(latency, throughput, cpu, agreed, startup, idle,
                       {side: resident_mb(p) for side, p in pids.items()}, {side: len(p) for side, p in pids.items()})
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            try:
                cluster.stop()
            except Exception as exc:  # the figures are taken; a messy Ray exit must not lose them
                say(f"WARNING: stopping Ray: {exc!r}")
        mesh.stop()


# -- report -------------------------------------------------------------------------------------


def _ray_version() -> str:
    import ray

    return str(ray.__version__)


def _verdict(ok: bool) -> str:
    return "meets goal" if ok else "MISSES goal"


def _cpu_total(roles: dict[str, float]) -> float:
    """CPU per search of the serving side's processes, the bench client (this process) left out."""
    return sum(v for role, v in roles.items() if role != "client (bench)")


def report(cfg: RayBenchConfig, fig: Figures, n_photos: int) -> str:
    lat, thr, cpu, agreed = fig.latency, fig.throughput, fig.cpu_ms, fig.agreement
    best = {side: max(v) for side, v in thr.items()}
    labels = {"mesh": "meshserve through the gateway",
              "ray": "Ray Serve graph (handle)" + (", throughput mode" if cfg.ray_throughput_optimized else "")}
    w = max(len(label) for label in labels.values()) + 1
    lines = [
        "",
        f"photo search, mesh vs Ray Serve {_ray_version()} in one run ("
        + ("RAY_SERVE_THROUGHPUT_OPTIMIZED=1" if cfg.ray_throughput_optimized else "Ray Serve's defaults")
        + f"): quick models, S={cfg.shards} shards, {n_photos} held-out "
        f"photos, top_k {bg.TOP_K}, min score {cfg.min_score}; torch on 1 thread per model process/replica",
        "",
        f"agreement, {agreed.photos} photos through both sides: detections mesh {agreed.detections[0]} / Ray "
        f"{agreed.detections[1]}, same label {agreed.same_label}, same top-1 item {agreed.same_top1}, item ids "
        f"shared {agreed.shared_ids}/{agreed.compared_ids}, largest score difference {agreed.max_score_diff:.2g} "
        f"→ {'the same results' if agreed.whole else 'RESULTS DIFFER: the comparison is not of the same work'}",
        "",
        f"{'side':<{w}} {'p50 ms':>8} {'p99 ms':>8} {'searches/s':>11} {'CPU ms/search':>14}",
    ]
    for side in ("mesh", "ray"):
        lines.append(f"{labels[side]:<{w}} {bg.ms(lat[side].p50)} {bg.ms(lat[side].p99)} {best[side]:11.1f} "
                     f"{_cpu_total(cpu[side]):14.1f}")  # fmt: skip
    thr_ratio, p50_ratio = best["mesh"] / best["ray"], lat["mesh"].p50 / lat["ray"].p50
    p99_ratio = lat["mesh"].p99 / lat["ray"].p99
    cpu_ratio = _cpu_total(cpu["mesh"]) / max(_cpu_total(cpu["ray"]), 1e-9)
    lines += [
        f"{'ratio mesh / Ray':<{w}} {p50_ratio:8.2f} {p99_ratio:8.2f} {thr_ratio:11.2f} {cpu_ratio:14.2f}",
        f"{'goal (issue #19)':<{w}} {'≤ ' + str(P50_GOAL):>8} {'≤ ' + str(P99_GOAL):>8} "
        f"{'≥ ' + str(THROUGHPUT_GOAL):>11}",
        f"p50 {_verdict(p50_ratio <= P50_GOAL)}, p99 {_verdict(p99_ratio <= P99_GOAL)}, "
        f"throughput {_verdict(thr_ratio >= THROUGHPUT_GOAL)}",
        "",
        f"p50/p99 at concurrency 1, interleaved; searches/s: best of {len(thr['mesh'])} alternating rounds with "
        f"{bg.CONCURRENCY} in flight (rounds: "
        + "; ".join(f"{side} " + ", ".join(f"{v:.1f}" for v in thr[side]) for side in ("mesh", "ray")) + ")",
    ]
    for side in ("mesh", "ray"):
        parts = ", ".join(f"{role} {v:.1f}" for role, v in sorted(cpu[side].items(), key=lambda kv: -kv[1])
                          if v >= 0.05 and role != "client (bench)")  # fmt: skip
        lines.append(f"CPU ms per search, {side}: {parts}; the bench client (this process, left out) "
                     f"{cpu[side].get('client (bench)', 0.0):.1f}")  # fmt: skip
    lines.append("start-up: " + ", ".join(f"{what} {s:.1f} s" for what, s in fig.startup_s.items()))
    lines.append(f"up but idle for {IDLE_S:g} s, cores kept busy: mesh {fig.idle_cores['mesh']:.3f}, "
                 f"Ray {fig.idle_cores['ray']:.3f}; processes: mesh {fig.processes['mesh']}, "
                 f"Ray {fig.processes['ray']}; resident memory (shared pages counted per process): "
                 f"mesh {fig.resident_mb['mesh']:.0f} MB, Ray {fig.resident_mb['ray']:.0f} MB")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> RayBenchConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bg.add_search_arguments(parser, quick_queries=20)
    parser.add_argument("--quick", action="store_true", help="a run of a few minutes: 20 photos")
    parser.add_argument("--shards", type=int, default=4, help="index shards S on both sides (default 4)")
    parser.add_argument("--indexer-processes", type=int, default=bg.UP_INDEXER_PROCESSES, metavar="N",
                        help=f"the mesh's shards on N indexer processes (default {bg.UP_INDEXER_PROCESSES}, up's; "
                             "0: one per shard); Ray keeps one replica per shard")  # fmt: skip
    parser.add_argument("--agree", type=int, default=5, help="photos whose results are compared (default 5)")
    parser.add_argument("--ray-throughput-optimized", action="store_true",
                        help="run Ray Serve in its high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: "
                             "gRPC between replicas, user code on the replica's loop), not its defaults")  # fmt: skip
    args = parser.parse_args(argv)
    if args.home is None:
        parser.error("no models: pass --home DIR or set MESHSERVE_HOME")
    queries = args.queries or (20 if args.quick else 60)
    return RayBenchConfig(
        home=Path(args.home).expanduser().resolve(),
        queries=queries,
        shards=args.shards,
        min_score=args.min_score,
        throughput_requests=max(4 * bg.CONCURRENCY, 4 * queries),  # rounds of a few seconds even with --quick
        warmup=min(queries, 4 if args.quick else 8),
        agreement_photos=min(args.agree, queries),
        ray_throughput_optimized=args.ray_throughput_optimized,
        indexer_processes=args.indexer_processes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.ray_throughput_optimized:  # read when ray.serve is imported, here and in every Ray process
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("Ray Serve is not installed: pip install -e '.[bench]' (an optional extra)") from None
    from meshserve.inference.artifacts import latest
    from meshserve.local.demo import held_out_photos

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    missing = [k for k in ("detector", "embedder", "classifier", "shipping") if latest(k, cfg.home) is None]
    if missing:
        raise SystemExit(f"{cfg.home} has no trained {', '.join(missing)}: run `meshserve train --quick` first")
    import torch

    torch.set_num_threads(1)
    photos = [p.jpeg for p in held_out_photos(cfg.home, cfg.queries)]
    print(report(cfg, run(cfg, photos, say), len(photos)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
