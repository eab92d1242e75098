"""`meshserve worker` (runs queued jobs) and `meshserve jobs submit|get|list|dead-letter`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from meshserve.rpc.tls_files import add_tls_arguments, tls_from_args

DEFAULT_GATEWAY = "127.0.0.1:50050"
STATES = ("queued", "running", "succeeded", "failed", "dead_lettered")

_WORKER_HELP = """\
Take jobs from the job queue's durable consumer (NATS JetStream), run each through a gateway's
synchronous call (PhotoSearch/Search, ListingGuard/Check), store the result, then acknowledge.
Failed runs are retried with backoff; after MESHSERVE_JOBS_MAX_DELIVERIES (default 5) deliveries
the job is dead-lettered. Registers as meshserve-worker; SIGTERM drains (the job in hand finishes
within --grace, else goes back to the queue). Start more workers to go faster.

environment:
  NATS_URL            the job queue (default: the registry's meshserve-nats, else nats://127.0.0.1:4222)
  CONSUL_HTTP_ADDR    the registry, where gateways and NATS are found
  MESHSERVE_JOBS_*    queue limits shared with the gateway: MAX_JOBS, MAX_BYTES, MAX_DELIVERIES,
                      ACK_WAIT_S, JOB_TIMEOUT_S, BACKOFF_S (comma-separated seconds)
"""


def add_commands(subparsers: Any) -> None:
    worker = subparsers.add_parser("worker", help="run queued jobs (search, check) through the gateway",
                                   description=_WORKER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    worker.add_argument("--host", default="127.0.0.1", help="address of the health endpoint (default 127.0.0.1)")
    worker.add_argument("--port", type=int, default=0, help="health gRPC port (default 0 = any free port)")
    worker.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    worker.add_argument("--concurrency", type=int, default=1, help="jobs in hand at once (default 1)")
    worker.add_argument("--gateway", help="gateway HOST:PORT (default: passing meshserve-gateway in the registry)")
    worker.add_argument("--nats", help="NATS URL (default: $NATS_URL, else the registry's meshserve-nats)")
    worker.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")
    worker.add_argument("--no-register", action="store_true", help="do not register in the registry")
    worker.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port "
                        "(0: any free port; registered in the meta; HTTPS wanting a mesh client certificate "
                        "with mTLS)")
    worker.add_argument("--check-interval", type=float, default=1.0, help="registry check interval, s (default 1)")
    worker.add_argument("--grace", type=float, default=30.0, help="seconds to finish the job in hand on SIGTERM")
    worker.add_argument("--trace-file", type=Path, default=os.environ.get("MESHSERVE_TRACE_FILE") or None,
                        help="write spans as JSON lines here when no OTLP endpoint is set")
    add_tls_arguments(worker)
    worker.set_defaults(func=_worker)

    jobs = subparsers.add_parser("jobs", help="submit asynchronous jobs and read their state")
    sub = jobs.add_subparsers(dest="jobs_command", metavar="COMMAND")
    jobs.set_defaults(func=lambda args: (jobs.print_help(), 2)[1])

    submit = sub.add_parser("submit", help="queue a job on the gateway (Jobs/Submit)")
    kinds = submit.add_subparsers(dest="kind", metavar="KIND", required=True)
    search = kinds.add_parser("search", help="a photo search: IMAGE")
    search.add_argument("image", type=Path, metavar="IMAGE", help="a JPEG, PNG or WebP photo")
    search.add_argument("--top-k", type=int, default=0, help="matches per detection (default: the gateway's)")
    search.add_argument("--min-score", type=float, default=0.0, help="drop detections below (default: the gateway's)")
    check = kinds.add_parser("check", help="a listing check (ListingGuard/Check)")
    check.add_argument("--listing-id", required=True, help="the listing's id")
    check.add_argument("--title", default="", help="listing title")
    check.add_argument("--description", default="", help="listing description")
    check.add_argument("--image", type=Path, action="append", default=[], help="a listing photo (repeatable)")
    check.add_argument("--price-cents", type=int, default=0, help="price in cents")
    check.add_argument("--category", default="", help="listing category")
    check.add_argument("--model", action="append", default=[], help="only this classifier (repeatable)")
    for parser in (search, check):
        _common(parser)
        parser.add_argument("--job-id", default="", help="your id for the job: submitting it again is a no-op")
        parser.add_argument("--wait", action="store_true", help="wait for a final state and print the job")
        parser.add_argument("--wait-timeout", type=float, default=120.0, help="give up waiting after this (s)")
        parser.set_defaults(func=_submit)

    get = sub.add_parser("get", help="a job's state, attempts, result or error (Jobs/Get)")
    get.add_argument("job_id", metavar="ID")
    get.add_argument("--watch", action="store_true", help="print every change until the job is final (Jobs/Watch)")
    _common(get)
    get.set_defaults(func=_get)

    listing = sub.add_parser("list", help="jobs in the queue's store (read from NATS)")
    listing.add_argument("--state", action="append", choices=STATES, default=[], help="only these (repeatable)")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    _nats(listing)
    listing.set_defaults(func=_list)

    dead = sub.add_parser("dead-letter", help="dead-lettered jobs and their errors; --requeue runs one again")
    dead.add_argument("--requeue", metavar="ID", help="queue this dead-lettered job again with fresh attempts")
    _nats(dead)
    dead.set_defaults(func=_dead_letter)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default=os.environ.get("MESHSERVE_GATEWAY", DEFAULT_GATEWAY),
                        help=f"gateway HOST:PORT (default $MESHSERVE_GATEWAY or {DEFAULT_GATEWAY})")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, s (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _nats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", help="NATS URL (default: $NATS_URL, else the registry's meshserve-nats)")
    parser.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _fail(what: str, exc: BaseException | str) -> int:
    print(f"meshserve jobs {what}: {exc}", file=sys.stderr)
    return 1


def _worker(args: argparse.Namespace) -> int:
    from meshserve.jobs.worker import WorkerConfig, run_worker
    from meshserve.registry.config import RegistryConfig

    try:
        config = WorkerConfig(
            registry=RegistryConfig.from_env(http_addr=args.consul), nats_url=args.nats, gateway=args.gateway,
            host=args.host, port=args.port, concurrency=args.concurrency, metrics_port=args.metrics_port,
            check_interval_s=args.check_interval, grace_s=args.grace, port_file=args.port_file,
            trace_file=args.trace_file, register=not args.no_register, tls=tls_from_args(args),
        )  # fmt: skip
    except ValueError as exc:
        print(f"meshserve worker: {exc}", file=sys.stderr)
        return 2
    from meshserve.rpc import event_loop

    return event_loop.run(run_worker(config))


def _submit(args: argparse.Namespace) -> int:
    import grpc

    from meshserve.jobs.client import job_json, render, submit, wait_final
    from meshserve.v1 import jobs_pb2, listing_guard_pb2, photo_search_pb2

    request = jobs_pb2.SubmitJobRequest(job_id=args.job_id)
    try:
        if args.kind == "search":
            request.search.CopyFrom(photo_search_pb2.SearchRequest(image=args.image.read_bytes(), top_k=args.top_k,
                                                                   min_detection_score=args.min_score))
        else:
            listing = listing_guard_pb2.Listing(listing_id=args.listing_id, title=args.title,
                                                description=args.description, price_cents=args.price_cents,
                                                category=args.category, images=[p.read_bytes() for p in args.image])
            request.check.CopyFrom(listing_guard_pb2.CheckRequest(listing=listing, models=args.model))
    except OSError as exc:
        print(f"meshserve jobs submit: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        reply = submit(args.gateway, request, args.timeout)
        if not args.wait:
            print(reply.job_id if not args.json else f'{{"job_id": "{reply.job_id}", "created": '
                  f'{str(reply.created).lower()}}}')  # fmt: skip
            return 0
        job = wait_final(args.gateway, reply.job_id, args.timeout, args.wait_timeout)
    except (grpc.RpcError, TimeoutError) as exc:
        return _fail("submit", _grpc_text(exc))
    print(job_json(job) if args.json else render(job))
    return 0 if job.state == jobs_pb2.JOB_STATE_SUCCEEDED else 1


def _get(args: argparse.Namespace) -> int:
    import grpc

    from meshserve.jobs.client import get, job_json, render, render_line

    try:
        if args.watch:
            from meshserve.jobs.client import watch

            for job in watch(args.gateway, args.job_id):
                print(job_json(job, compact=True) if args.json else render_line(job), flush=True)
            return 0
        job = get(args.gateway, args.job_id, args.timeout)
    except grpc.RpcError as exc:
        return _fail("get", _grpc_text(exc))
    print(job_json(job) if args.json else render(job))
    return 0


def _list(args: argparse.Namespace) -> int:
    import asyncio

    from meshserve.errors import MeshError
    from meshserve.jobs.client import job_json, list_jobs, render_line

    try:
        jobs = asyncio.run(list_jobs(args.nats, args.consul, frozenset(args.state), args.limit))
    except MeshError as exc:
        return _fail("list", exc)
    for job in jobs:
        print(job_json(job, compact=True) if args.json else render_line(job))
    return 0


def _dead_letter(args: argparse.Namespace) -> int:
    import asyncio

    from meshserve.errors import MeshError
    from meshserve.jobs.client import dead_letters, job_json, render_line, requeue

    try:
        if args.requeue:
            job = asyncio.run(requeue(args.nats, args.consul, args.requeue))
            print(f"requeued {job.job_id}")
            return 0
        jobs = asyncio.run(dead_letters(args.nats, args.consul))
    except MeshError as exc:
        return _fail("dead-letter", exc)
    for job in jobs:
        print(job_json(job, compact=True) if args.json else render_line(job))
    return 0


def _grpc_text(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        return f"{code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return str(exc)
