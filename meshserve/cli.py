"""The `meshserve` command: one entry point, one subcommand family per room."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Each room owns the subcommands of its job; a room module exposes
# `add_commands(subparsers)` and sets `func` on every parser it adds.
# Heavy imports (torch, grpc servers) happen inside the handlers, not here.
ROOM_COMMANDS = (
    "meshserve.registry.cli",  # registry dev
    "meshserve.servers.cli",  # serve <kind>
    "meshserve.training.cli",  # catalog, train
    "meshserve.training.shard_cli",  # shard build|publish|retire|list
    "meshserve.training.train_cli",  # train
    "meshserve.gateway.cli",  # gateway, search, status
    "meshserve.local.cli",  # up, demo, worker, bench
    "meshserve.health_cli",  # health HOST:PORT
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshserve",
        description="A gRPC model-serving mesh: model servers registered in Consul, "
        "a gateway that discovers them, photo search over sharded indexes.",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="Python logging level (default: INFO)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in ROOM_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # that room has no commands yet
        module.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
