"""The `meshserve` command: one entry point, one subcommand family per room."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from meshserve import health_cli
from meshserve.gateway import cli as gateway_cli
from meshserve.gateway import guard_cli, rollout_cli
from meshserve.jobs import cli as jobs_cli
from meshserve.local import bench_cli, ops_cli, search_cli
from meshserve.local import cli as local_cli
from meshserve.pki import cli as pki_cli
from meshserve.queue import cli as queue_cli
from meshserve.registry import acl_cli
from meshserve.registry.dev import cli as registry_cli
from meshserve.servers import cli as servers_cli
from meshserve.training import cli as training_cli
from meshserve.training import shard_cli, train_cli

# Each room owns the subcommands of its job; a room module exposes `add_commands(subparsers)`
# and sets `func` on every parser it adds. Their module level stays light (no torch, no gRPC
# server, no training code): heavy imports happen inside the handlers.
ROOM_COMMANDS = (
    registry_cli,  # registry dev
    acl_cli,  # acl bootstrap, acl policy|token create|list
    servers_cli,  # serve <kind>
    training_cli,  # catalog
    shard_cli,  # shard build|publish|retire|list
    train_cli,  # train
    gateway_cli,  # gateway, status
    guard_cli,  # guard check, config get|set|validate
    rollout_cli,  # rollout start|status|promote|abort
    search_cli,  # search IMAGE
    local_cli,  # up, demo
    bench_cli,  # bench [NAME]
    health_cli,  # health HOST:PORT
    ops_cli,  # prometheus sd|run, top, trace
    queue_cli,  # nats dev
    jobs_cli,  # worker, jobs submit|get|list|dead-letter
    pki_cli,  # certs init|issue|show
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshserve",
        description="A gRPC model-serving mesh: model servers registered in Consul, "
        "a gateway that discovers them, photo search over sharded indexes.",
    )
    parser.add_argument(
        "--log-level", default="INFO",
        help="Python logging level (default: INFO); lines are JSON when stderr is not a terminal "
        "(MESHSERVE_LOG_FORMAT=json|text to choose)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for room in ROOM_COMMANDS:
        room.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from meshserve.logs import configure_logging

    try:  # JSON lines with trace ids when stderr is not a terminal
        configure_logging(args.log_level)
    except ValueError as exc:
        print(f"meshserve: {exc}", file=sys.stderr)
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
