"""Asynchronous jobs vs synchronous calls: jobs/s with 1, 2 and 4 workers, and submit → result-stored
latency, beside the same calls made synchronously at concurrency 16 — in one run, one mesh.

Run:  nice -n 10 python bench/jobs.py --home ~/.cache/meshserve --jobs 500 --kind check
      nice -n 10 python bench/jobs.py --tiny-home /tmp/bench-home --jobs 120     # trains tiny models once

One local mesh (dev registry, NATS JetStream from `meshserve nats dev`, 1 detector, 1 embedder,
2 shards, the gateway; model servers `--threads 1`) over the same held-out photos on both sides:

(a) synchronous: N PhotoSearch/Search calls, 16 in flight (grpc.aio, one channel); throughput and
    p50/p90/p99 of each call.
(b) asynchronous, for W = 1, 2, 4 `meshserve worker` processes with one job in hand each, and 4
    workers with 4 each (16 in flight, as the synchronous side): N
    Jobs/Submit calls (16 in flight), then wait until every job is final. jobs/s is N over the time from
    the first submit to the last result stored; latency is each job's record: updated_at (result stored)
    − submitted_at (both written on this machine's clock).

Every search sets `no_cache=True`, so the gateway's prediction cache never answers; with `--kind
check` every job is a listing check (ListingGuard/Check, the three classifiers and the shipping
estimator) of a listing whose text is new in the run, so no verdict comes from the cache. The machine has 2 shared
cores: more workers than cores add queueing, not compute — the point is that the queue adds little
beside what the synchronous path costs and loses nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from meshserve.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    listing_guard_pb2,
    listing_guard_pb2_grpc,
    photo_search_pb2,
    photo_search_pb2_grpc,
)

CONCURRENCY = 16
MIN_SCORE = 0.01


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def request(image: bytes) -> photo_search_pb2.SearchRequest:
    return photo_search_pb2.SearchRequest(image=image, min_detection_score=MIN_SCORE, no_cache=True)


def listing(run: str, i: int) -> listing_guard_pb2.CheckRequest:
    """A listing whose text no earlier call carried (the verdict cache keys on the content)."""
    return listing_guard_pb2.CheckRequest(listing=listing_guard_pb2.Listing(
        listing_id=f"{run}-{i}", title=f"brass table lamp no. {i} ({run})", category="home",
        description="working, original shade; pick up or ship", price_cents=1500 + i,
        attributes={"width_cm": "20", "height_cm": "45", "depth_cm": "20", "weight_kg": "1.5"}))  # fmt: skip


def job_request(kind: str, photos: list[bytes], run: str, i: int, job_id: str) -> jobs_pb2.SubmitJobRequest:
    if kind == "check":
        return jobs_pb2.SubmitJobRequest(job_id=job_id, check=listing(run, i))
    return jobs_pb2.SubmitJobRequest(job_id=job_id, search=request(photos[i % len(photos)]))


async def run_sync(target: str, kind: str, photos: list[bytes], n: int, run: str) -> tuple[float, list[float]]:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        search = photo_search_pb2_grpc.PhotoSearchStub(channel)
        guard = listing_guard_pb2_grpc.ListingGuardStub(channel)
        todo = iter(range(n))

        async def lane() -> None:
            for i in todo:
                began = time.perf_counter()
                if kind == "check":
                    await guard.Check(listing(run, i), timeout=60)
                else:
                    await search.Search(request(photos[i % len(photos)]), timeout=60)
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
        return n / (time.perf_counter() - began), latencies


async def run_async(target: str, kind: str, photos: list[bytes], n: int, tag: str) -> tuple[float, list[float]]:
    ids = [f"bench-{tag}-{i}" for i in range(n)]  # tag is new every run: the job store persists
    async with grpc.aio.insecure_channel(target) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        todo = iter(enumerate(ids))

        async def lane() -> None:
            for i, job_id in todo:
                reply = await stub.Submit(job_request(kind, photos, tag, i, job_id), timeout=30)
                if not reply.created:
                    raise RuntimeError(f"job {job_id} existed before this run")

        await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
        final = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_DEAD_LETTERED}
        done: dict[str, jobs_pb2.Job] = {}
        deadline = time.monotonic() + 600
        while len(done) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n - len(done)} jobs not final after 600 s")
            for job_id in [j for j in ids if j not in done]:
                job = await stub.Get(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)
                if job.state in final:
                    done[job_id] = job
                else:
                    break  # jobs finish roughly in order: look again later
            await asyncio.sleep(0.2)
    failed = [j for j in done.values() if j.state != jobs_pb2.JOB_STATE_SUCCEEDED]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0].error}")
    first = min(j.submitted_at for j in done.values())
    last = max(j.updated_at for j in done.values())
    return n / (last - first), [j.updated_at - j.submitted_at for j in done.values()]


def line(name: str, rate: float, latencies: list[float]) -> str:
    p50, p90, p99 = (1000 * pct(latencies, q) for q in (0.5, 0.9, 0.99))
    return f"{name:<28} {rate:8.1f} /s   p50 {p50:8.1f} ms   p90 {p90:8.1f} ms   p99 {p99:8.1f} ms"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=os.environ.get("MESHSERVE_HOME"),
                        help="a MESHSERVE_HOME with trained models (default $MESHSERVE_HOME)")
    parser.add_argument("--tiny-home", type=Path, help="train tiny models here if missing, and use it")
    parser.add_argument("--jobs", type=int, default=200, help="jobs (and synchronous calls) per row (default 200)")
    parser.add_argument("--kind", choices=("search", "check"), default="search",
                        help="photo searches or listing checks (default search)")
    parser.add_argument("--workers", default="1,2,4,4x4",
                        help="rows of W workers, or WxC: W workers with C jobs in hand each (default 1,2,4,4x4)")
    args = parser.parse_args(argv)
    home = args.tiny_home or args.home
    if home is None:
        parser.error("give --home or --tiny-home")
    if args.tiny_home and not (args.tiny_home / "models").is_dir():
        from meshserve.training.train import TrainPlan, run

        print(f"training tiny models into {args.tiny_home} …", file=sys.stderr)
        run(TrainPlan(n_items=80, seed=7, home=args.tiny_home, progress=False, tiny=True))

    from meshserve.local.demo import held_out_photos
    from meshserve.local.mesh import LocalMesh, MeshConfig
    from meshserve.local.supervisor import ChildSpec

    photos = [p.jpeg for p in held_out_photos(home, 8)]
    config = MeshConfig(home=home, registry_addr=f"127.0.0.1:{free_port()}", gateway_addr=f"127.0.0.1:{free_port()}",
                        detectors=1, embedders=1, shards=2, nats_addr=f"127.0.0.1:{free_port()}")  # fmt: skip
    mesh = LocalMesh(config, say=lambda text: print(text, file=sys.stderr))
    rows = []
    run = f"{int(time.time())}"
    try:
        info = mesh.start()
        asyncio.run(run_sync(info.gateway, args.kind, photos, 16, f"{run}-warm"))  # warm every stage
        rate, lat = asyncio.run(run_sync(info.gateway, args.kind, photos, args.jobs, f"{run}-sync"))
        rows.append(line(f"synchronous, {CONCURRENCY} in flight", rate, lat))
        print(rows[-1], file=sys.stderr)
        for row in args.workers.split(","):
            count, _, in_hand = row.partition("x")
            workers = []
            for i in range(int(count)):
                name = f"bench-worker-{row}-{i}"
                port_file = config.run_dir / "ports" / f"{name}.port"
                workers.append(mesh.supervisor.start(ChildSpec(name, (
                    "worker", "--port", str(free_port()), "--port-file", str(port_file), "--concurrency",
                    in_hand or "1"), port_file=port_file)))
            for worker in workers:
                mesh.supervisor.wait_port(worker, 60)
            rate, lat = asyncio.run(run_async(info.gateway, args.kind, photos, args.jobs, f"{run}-w{row}"))
            rows.append(line(f"jobs, {count} worker(s) × {in_hand or 1} in hand", rate, lat))
            print(rows[-1], file=sys.stderr)
            for worker in workers:
                worker.proc.send_signal(signal.SIGTERM)
            for worker in workers:
                worker.proc.wait(timeout=60)
    finally:
        mesh.stop()
    what = "listing checks (text new in every row)" if args.kind == "check" else "photo searches (no_cache)"
    print(f"\n{args.jobs} {what} per row; job latency is submit → result stored, from the job records")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
