"""The operator's commands: `prometheus sd|run`, `top` and `trace`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from meshserve.rpc.tls_files import add_tls_arguments


def add_commands(subparsers: Any) -> None:
    prometheus = subparsers.add_parser(
        "prometheus", help="Prometheus over the mesh: service discovery from the registry, a local server",
        description="Prometheus finds every replica through the registry: `sd` answers Prometheus's HTTP "
        "service discovery (http_sd_configs) with the passing replicas of every meshserve-* service that "
        "registered a metrics_port; `run` starts the `prometheus` binary with a config pointing at it.",
    )  # fmt: skip
    commands = prometheus.add_subparsers(dest="prometheus_command", metavar="COMMAND", required=True)
    sd = commands.add_parser(
        "sd", help="serve http_sd targets (GET /targets) computed from the registry",
        description="Serve Prometheus HTTP service discovery at http://HOST:PORT/targets: one target group per "
        "passing replica (host:metrics_port), labelled service, instance_id, model, version, role, shard, "
        "embedder_version, index from its registration. 503 while the registry does not answer (Prometheus "
        "then keeps the targets it had).",
    )  # fmt: skip
    sd.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sd.add_argument("--port", type=int, default=9091, help="port (default 9091; 0 = any free port)")
    sd.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    sd.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR or http://127.0.0.1:8500)")
    sd.set_defaults(func=_sd)

    run = commands.add_parser(
        "run", help="write a config under --dir and run the `prometheus` binary with it",
        description="Write DIR/prometheus.yml (one job discovered through --sd-url, short scrape and refresh "
        "intervals, the rules of deploy/prometheus/rules) and exec `prometheus` with it, its data in DIR/data.",
    )  # fmt: skip
    run.add_argument("--sd-url", required=True, help="the http_sd endpoint, e.g. http://127.0.0.1:9091/targets")
    run.add_argument("--listen", default="127.0.0.1:9090", help="Prometheus's HOST:PORT (default 127.0.0.1:9090)")
    run.add_argument("--dir", type=Path, help="config and data directory (default $MESHSERVE_HOME/up/prometheus)")
    run.add_argument("--scrape-interval", type=float, default=2.0, help="seconds between scrapes (default 2)")
    run.add_argument("--refresh-interval", type=float, default=2.0,
                     help="seconds between service-discovery refreshes (default 2)")
    run.add_argument("--rules", type=Path, help="directory of rule files (default: the repository's "
                     "deploy/prometheus/rules when present)")  # fmt: skip
    add_tls_arguments(run)  # Prometheus's client certificate for targets serving /metrics over mTLS
    run.set_defaults(func=_run)

    top = subparsers.add_parser(
        "top", help="live table of services, replicas, health, rates, errors, latency and coverage",
        description="Every replica of every meshserve-* service in the registry with its health, and what its "
        "/metrics say (read directly, no Prometheus needed): requests/s, errors/s, p50/p99 per service and per "
        "gateway stage, coverage, versions. Refreshes until Ctrl-C.",
    )  # fmt: skip
    top.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR or http://127.0.0.1:8500)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between frames (default 2)")
    top.add_argument("--once", action="store_true", help="print one frame (totals since start) and exit")
    top.set_defaults(func=_top)

    trace = subparsers.add_parser(
        "trace", help="print the waterfall of one trace (from the trace file or Jaeger)",
        description="Print every span of TRACE_ID (from `search --json`'s trace_id or a log line) as a "
        "waterfall, read from the JSON-lines trace file the processes write, or from Jaeger's query API "
        "when --jaeger or $MESHSERVE_TRACE_QUERY names it (spans sent over OTLP end up there).",
    )  # fmt: skip
    trace.add_argument("trace_id", metavar="TRACE_ID", help="32 hex digits")
    trace.add_argument("--trace-file", type=Path,
                       help="JSON-lines span file (default: $MESHSERVE_TRACE_FILE, else "
                       "$MESHSERVE_HOME/up/traces.jsonl, where `meshserve up` writes)")  # fmt: skip
    trace.add_argument("--jaeger", metavar="URL",
                       help="Jaeger query service, e.g. http://127.0.0.1:16686 (default: $MESHSERVE_TRACE_QUERY)")
    trace.set_defaults(func=_trace)


def _sd(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from meshserve.registry.config import RegistryConfig
    from meshserve.registry.prometheus_sd import SDServerConfig, serve_sd

    try:
        config = SDServerConfig(RegistryConfig.from_env(http_addr=args.consul), host=args.host, port=args.port,
                                port_file=args.port_file)  # fmt: skip
    except ValueError as exc:
        print(f"meshserve prometheus sd: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_sd(config, stop)

    try:
        asyncio.run(main())
    except OSError as exc:  # the port is taken, or the like
        print(f"meshserve prometheus sd: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    from meshserve.local.prometheus import REPO_RULES, PrometheusConfig, parse_addr, prometheus_argv, write_config
    from meshserve.rpc.tls_files import client_files

    try:
        directory = args.dir or _home() / "up" / "prometheus"
        if args.rules is not None and not args.rules.is_dir():
            raise ValueError(f"--rules {args.rules}: not a directory")
        config = PrometheusConfig(args.sd_url, scrape_interval_s=args.scrape_interval,
                                  refresh_interval_s=args.refresh_interval, rules_dir=args.rules or REPO_RULES,
                                  tls=client_files(args))  # fmt: skip
        parse_addr(args.listen)  # the form only: Prometheus says so itself if the port is taken
        argv = prometheus_argv(write_config(config, directory), args.listen, directory / "data")
    except (ValueError, RuntimeError) as exc:
        print(f"meshserve prometheus run: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # keeps the pid, so supervisors and the parent-death signal still reach it


def _home() -> Path:
    from meshserve.inference.artifacts import meshserve_home

    return meshserve_home()


def _top(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import signal

    from meshserve.errors import MeshError
    from meshserve.local.top import frames, render
    from meshserve.registry.config import RegistryConfig
    from meshserve.rpc.tls_files import client_files

    try:
        if not args.interval > 0:
            raise ValueError(f"--interval {args.interval}: must be > 0")
        config = RegistryConfig.from_env(http_addr=args.consul)
    except ValueError as exc:
        print(f"meshserve top: {exc}", file=sys.stderr)
        return 2
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""

    async def main() -> None:
        # Ctrl-C both cancels the frame in progress and stops the loop: a cancellation that lands as a
        # scrape completes can be lost inside asyncio.wait_for, the stop flag cannot
        stop, frame_task = asyncio.Event(), asyncio.current_task()

        def interrupt() -> None:
            stop.set()
            if frame_task is not None:
                frame_task.cancel()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt)
        previous = None
        with contextlib.suppress(asyncio.CancelledError):
            async for frame in frames(config, args.interval, tls=client_files(), stop=stop):
                text = render(frame, previous, config.http_addr)
                sys.stdout.write(f"{clear}{text}\n" + ("" if clear or args.once else "\n"))
                sys.stdout.flush()
                if args.once or stop.is_set():
                    return
                previous = frame

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return 0
    except MeshError as exc:
        print(f"meshserve top: {exc}", file=sys.stderr)
        return 1
    return 0


def _trace(args: argparse.Namespace) -> int:
    import re
    import urllib.error

    from meshserve.local.demo import waterfall
    from meshserve.local.traces import QUERY_ENV, from_file, from_jaeger
    from meshserve.telemetry import TRACE_FILE_ENV

    trace_id = args.trace_id.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{32}", trace_id):
        print(f"meshserve trace: {args.trace_id!r} is not a trace id (32 hex digits)", file=sys.stderr)
        return 2
    query = args.jaeger or os.environ.get(QUERY_ENV)
    if query and not args.trace_file:
        where = query
        try:
            spans = from_jaeger(query, trace_id)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            print(f"meshserve trace: Jaeger at {query} did not answer: {exc}", file=sys.stderr)
            return 1
    else:
        env_file = os.environ.get(TRACE_FILE_ENV)
        path = args.trace_file or (Path(env_file) if env_file else _home() / "up" / "traces.jsonl")
        if not path.is_file():
            print(f"meshserve trace: no trace file at {path} (pass --trace-file or --jaeger)", file=sys.stderr)
            return 1
        where, spans = str(path), from_file(path, trace_id)
    if not spans:
        print(f"meshserve trace: no span of trace {trace_id} in {where}", file=sys.stderr)
        return 1
    services = sorted({str(s.get("service")) for s in spans})
    print(f"trace {trace_id}: {len(spans)} spans from {', '.join(services)}")
    print(waterfall(spans))
    return 0
