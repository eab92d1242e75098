"""`meshserve up` and `meshserve demo`: the whole mesh on this machine."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

UP_INDEXER_PROCESSES = 2  # `up`'s layout: S shards on this many indexers (bench/gateway.py uses it too)


def _add_mesh_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway-addr", default="127.0.0.1:50050", help="gateway HOST:PORT (default 127.0.0.1:50050)")
    parser.add_argument("--consul", help="use this Consul (URL) instead of starting the dev registry")
    parser.add_argument("--registry-addr", default="127.0.0.1:8500",
                        help="where the dev registry listens when --consul is not given (default 127.0.0.1:8500)")
    parser.add_argument("--detectors", type=int, default=2, help="detector replicas (default 2)")
    parser.add_argument("--embedders", type=int, default=2, help="embedder replicas (default 2)")
    parser.add_argument("--shards", type=int, default=4, help="index shards over the catalogue (default 4)")
    parser.add_argument("--indexer-processes", type=int, default=UP_INDEXER_PROCESSES, metavar="N",
                        help="indexer processes the shards are dealt over, each registered once per shard it "
                        f"serves and searched with one call (default {UP_INDEXER_PROCESSES}; 0: one per shard)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model server (default 1)")
    parser.add_argument("--prometheus", action="store_true",
                        help="also run Prometheus (the `prometheus` binary) scraping every replica found through "
                        "the registry, with the alert rules; prints its URL")
    parser.add_argument("--prometheus-addr", default="127.0.0.1:9090",
                        help="where Prometheus listens with --prometheus (default 127.0.0.1:9090, or a free port "
                        "when that one is taken)")
    parser.add_argument("--nats-addr", default="127.0.0.1:4222",
                        help="where `nats dev` (the job queue) listens (default 127.0.0.1:4222; 'none' = no NATS)")
    parser.add_argument("--workers", type=int,
                        help="job workers (default 1, or 0 with --nats-addr none; they find NATS by NATS_URL then)")
    parser.add_argument("--insecure", action="store_true",
                        help="debugging only: no mTLS between the processes, plain HTTP to the registry and no "
                             "registry ACLs (default: mTLS, HTTPS on every port and ACLs, certificates under "
                             "$MESHSERVE_HOME/pki, tokens under $MESHSERVE_HOME/acl)")


def add_commands(subparsers: Any) -> None:
    epilog = ("MESHSERVE_HOME holds the catalogue, models, shards, logs and traces "
              "(default ~/.cache/meshserve). Models are trained with `train --quick` first if missing.")
    up = subparsers.add_parser(
        "up", help="run the whole mesh locally until Ctrl-C",
        description="Start the dev registry (or use --consul), train quick models if none exist, then "
        "NATS JetStream for jobs, detectors, embedders, classifiers, the shipping estimator, the indexer shards, "
        "the gateway and a job worker; "
        "print where everything listens; Ctrl-C stops everything.", epilog=epilog,
    )  # fmt: skip
    _add_mesh_arguments(up)
    up.set_defaults(func=_up)

    demo = subparsers.add_parser(
        "demo", help="up + example searches + a picture of the results + one trace, then stop",
        description="Bring the mesh up, search held-out photos through the gateway, write a contact sheet "
        "PNG, print one search's trace as a waterfall, coverage and versions, and stop the mesh.",
        epilog=epilog,
    )  # fmt: skip
    _add_mesh_arguments(demo)
    demo.add_argument("--queries", type=int, default=6, help="held-out photos to search (default 6)")
    demo.add_argument("-o", "--out", type=Path, help="contact sheet PNG (default $MESHSERVE_HOME/demo/results.png)")
    demo.add_argument("--min-score", type=float, default=0.0,
                      help="lowest detection score to search with (default: the gateway's own threshold)")
    demo.set_defaults(func=_demo)


def _config(args: argparse.Namespace) -> Any:
    from meshserve.inference.artifacts import meshserve_home
    from meshserve.local.mesh import MeshConfig

    return MeshConfig(home=meshserve_home(), consul=args.consul, registry_addr=args.registry_addr,
                      gateway_addr=args.gateway_addr, detectors=args.detectors, embedders=args.embedders,
                      shards=args.shards, indexer_processes=args.indexer_processes, threads=args.threads,
                      prometheus_addr=args.prometheus_addr if args.prometheus else None,
                      nats_addr=None if args.nats_addr == "none" else args.nats_addr,
                      workers=args.workers if args.workers is not None else int(args.nats_addr != "none"),
                      acl=not args.insecure, secure=not args.insecure)  # fmt: skip


def _up(args: argparse.Namespace) -> int:
    import signal

    from meshserve.local.mesh import LocalMesh

    try:
        config = _config(args)
    except ValueError as exc:
        print(f"meshserve up: {exc}", file=sys.stderr)
        return 2
    stop = {"requested": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["requested"] = True

    # Flushed: `up` usually runs with its output going to a file or a journal, where a crash and
    # restart line that sits in a buffer until exit is no use.
    mesh = LocalMesh(config, say=lambda line: print(line, flush=True))
    # During bring-up (minutes, with training) SIGTERM abandons it at once, as Ctrl-C does; a flag
    # would only be read once everything had started.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        info = mesh.start()
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        # A library waiting inside bring-up may have swallowed the KeyboardInterrupt: the flag remains.
        stop["requested"] = stop["requested"] or _INTERRUPTED["seen"]
        print(f"\nmeshserve is up:\n{info.table()}\n\nCtrl-C stops everything.", flush=True)
        mesh.watch(lambda: stop["requested"])
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as exc:
        print(f"meshserve up: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping …", flush=True)
        mesh.stop()
        print("stopped", flush=True)
        # Everything is stopped and flushed; skip the interpreter's teardown of torch and grpc
        # (seconds, and on a busy box it has hung `up` after "stopped").
        sys.stderr.flush()
        os._exit(0)


_INTERRUPTED = {"seen": False}


def _interrupt(signum: int, frame: object) -> None:
    _INTERRUPTED["seen"] = True
    raise KeyboardInterrupt


def _demo(args: argparse.Namespace) -> int:
    import signal

    from meshserve.local.demo import run_demo

    try:
        config = _config(args)
        if args.queries < 1:
            raise ValueError(f"--queries {args.queries}: search at least one photo")
        if not 0.0 <= args.min_score <= 1.0:
            raise ValueError(f"--min-score {args.min_score} is outside [0, 1]")
    except ValueError as exc:
        print(f"meshserve demo: {exc}", file=sys.stderr)
        return 2
    out = args.out or config.home / "demo" / "results.png"
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, _interrupt)  # stop the mesh in order, as on Ctrl-C
    try:
        return run_demo(config, out, queries=args.queries, min_score=args.min_score,
                        say=lambda line: print(line, flush=True))  # fmt: skip
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"meshserve demo: {exc}", file=sys.stderr)
        return 1
