"""`meshserve gateway` (the server) and `meshserve status` (the mesh as the registry sees it)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from meshserve.rpc.tls_files import add_tls_arguments

_ENV_HELP = """
environment:
  CONSUL_HTTP_ADDR   Consul (or `meshserve registry dev`) address, default http://127.0.0.1:8500
  CONSUL_HTTP_TOKEN  Consul ACL token
  OTEL_EXPORTER_OTLP_ENDPOINT  send spans over OTLP/gRPC (else --trace-file, else no export)
  MESHSERVE_HOME     the catalogue used to enrich matches (default ~/.cache/meshserve)
  NATS_URL           the job queue's NATS (default: the registry's meshserve-nats)
"""


def add_commands(subparsers: Any) -> None:
    gateway = subparsers.add_parser(
        "gateway", help="run the gateway (photo search and listing checks over the discovered mesh)",
        description="Discover model servers and shards in Consul and serve meshserve.v1.PhotoSearch and "
                    "meshserve.v1.ListingGuard (policies live from Consul KV meshserve/config/<flow>).",
        epilog=_ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    gateway.add_argument("--addr", help="HOST:PORT to listen on (default 127.0.0.1:50050; overrides --host/--port)")
    gateway.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, default=50050, help="gRPC port (default 50050; 0 = any free port)")
    gateway.add_argument("--advertise-address", help="address registered in Consul (default: --host)")
    gateway.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    gateway.add_argument("--metrics-port", type=int,
                         help="serve Prometheus /metrics on this port, 0 for any free one; registered as meta "
                         "metrics_port (default: off); HTTPS wanting a mesh client certificate with mTLS")
    gateway.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")
    gateway.add_argument("--no-register", action="store_true", help="do not register the gateway in Consul")
    gateway.add_argument("--check-interval", type=float, default=1.0,
                         help="Consul gRPC check interval of the gateway, s (≤ 2; default 1)")
    gateway.add_argument("--hedge-ms", type=float,
                         help="hedge detector/embedder calls after this many ms (default: off)")
    gateway.add_argument("--hedge-shards-ms", type=float,
                         help="ask the shards of an indexer call that has not answered after this many ms of "
                              "other replicas too; the first answer serves (default: off)")
    gateway.add_argument("--default-deadline", type=float, default=10.0,
                         help="deadline (s) for callers that send none (default 10)")
    gateway.add_argument("--cache-ttl", type=float, default=60.0,
                         help="seconds a search result and a catalogue row stay cached (default 60; 0 = off)")
    gateway.add_argument("--cache-max-mb", type=float, default=64.0,
                         help="search results kept in the cache take at most this many MiB (default 64)")
    gateway.add_argument("--grace", type=float, default=10.0, help="seconds to drain on SIGTERM (default 10)")
    gateway.add_argument("--nats", help="NATS URL of the job queue (default: $NATS_URL, else the registry's "
                         "meshserve-nats, else nats://127.0.0.1:4222)")
    gateway.add_argument("--trace-file", type=Path, default=os.environ.get("MESHSERVE_TRACE_FILE") or None,
                         help="write spans as JSON lines here when no OTLP endpoint is set")
    add_tls_arguments(gateway)
    gateway.set_defaults(func=_gateway)

    status = subparsers.add_parser(
        "status", help="services, replicas, health, versions, shards and coverage, flow policies",
        description="Read the mesh from the registry (works against real Consul too).",
        epilog=_ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    status.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from meshserve.errors import MeshError
    from meshserve.gateway.status import read_status, render
    from meshserve.registry.config import RegistryConfig
    from meshserve.rpc.tls_files import client_files

    try:
        status = asyncio.run(read_status(RegistryConfig.from_env(http_addr=args.consul), client_files()))
    except (MeshError, ValueError) as exc:
        print(f"meshserve status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


def _gateway(args: argparse.Namespace) -> int:
    from meshserve.gateway.photo_search import SearchConfig
    from meshserve.gateway.server import GatewayConfig, run_gateway
    from meshserve.registry.config import RegistryConfig
    from meshserve.rpc.tls_files import tls_from_args

    for flag, value in (("--hedge-ms", args.hedge_ms), ("--hedge-shards-ms", args.hedge_shards_ms)):
        if value is not None and not value > 0:
            print(f"meshserve gateway: {flag} {value:g}: need a number of milliseconds > 0", file=sys.stderr)
            return 2
    host, port = args.host, args.port
    if args.addr:
        host, _, port_text = args.addr.rpartition(":")
        if not host or not port_text.isdigit():
            print(f"meshserve gateway: --addr {args.addr!r} is not HOST:PORT", file=sys.stderr)
            return 2
        port = int(port_text)
    try:
        config = GatewayConfig(
            registry=RegistryConfig.from_env(http_addr=args.consul), host=host, port=port,
            advertise_address=args.advertise_address, metrics_port=args.metrics_port,
            register=not args.no_register, grace_s=args.grace, hedge_after_ms=args.hedge_ms,
            hedge_shards_after_ms=args.hedge_shards_ms,
            default_deadline_s=args.default_deadline, catalogue_ttl_s=args.cache_ttl,
            port_file=args.port_file, trace_file=args.trace_file, check_interval_s=args.check_interval,
            search=SearchConfig(cache_ttl_s=args.cache_ttl, cache_max_bytes=int(args.cache_max_mb * 1024 * 1024)),
            nats_url=args.nats, tls=tls_from_args(args),
        )  # fmt: skip
    except ValueError as exc:
        print(f"meshserve gateway: {exc}", file=sys.stderr)
        return 2
    from meshserve.rpc import event_loop

    return event_loop.run(run_gateway(config))
