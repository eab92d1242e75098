"""`meshserve shard build|publish|retire|list` and `meshserve pipeline run`: index shards into the mesh."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ENV_HELP = """
environment:
  CONSUL_HTTP_ADDR   Consul (or `meshserve registry dev`) address, default http://127.0.0.1:8500
  CONSUL_HTTP_TOKEN  Consul ACL token
  MESHSERVE_HOME     where run records and logs of published indexers live (default ~/.cache/meshserve)
"""


def add_commands(subparsers: Any) -> None:
    shard = subparsers.add_parser(
        "shard", help="build, publish, retire and list index shards",
        description="Index shards: one hnswlib index over a slice of the catalogue, served by indexers.",
    )  # fmt: skip
    commands = shard.add_subparsers(dest="shard_command", metavar="COMMAND", required=True)

    build = commands.add_parser(
        "build", help="embed a catalogue slice into a shard directory",
        description="Embed one reference photo per item of a catalogue slice with one embedder "
        "artifact and write an hnswlib index, id map and manifest.",
        epilog=_ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    build.add_argument("--embedder", help="embedder artifact dir or version (default: newest)")
    build.add_argument("--items", default="all",
                       help="slice: all | ids:LO-HI (item ids, HI exclusive) | time:START-END (unix s)")
    build.add_argument("-o", "--output", type=Path, required=True, help="shard directory to write")
    build.add_argument("--shard", help="shard id (default: the output directory's name)")
    build.add_argument("--index", default="catalogue", help="index name (default: catalogue)")
    build.add_argument("--generation", type=int, default=1, help="build generation (default 1)")
    build.add_argument("--M", type=int, default=16, help="hnswlib M (default 16)")
    build.add_argument("--ef-construction", type=int, default=200,
                       help="hnswlib ef_construction (default 200)")
    build.add_argument("--ef", type=int, default=64,
                       help="search ef, fixed for the shard's life (default 64)")
    build.set_defaults(func=_reporting_errors(_build), command_label="shard build")

    publish = commands.add_parser(
        "publish", help="start indexers for a shard and wait until they pass",
        description="Start R indexer processes for SHARD_DIR, detached, and wait until Consul "
        "reports every one passing; print what was published.",
        epilog=_ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    publish.add_argument("shard_dir", type=Path, metavar="SHARD_DIR")
    publish.add_argument("--replicas", type=int, default=1, help="indexer processes (default 1)")
    publish.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")
    publish.add_argument("--host", default="127.0.0.1", help="address the indexers bind and register")
    publish.add_argument("--check-interval", type=float, default=1.0, help="Consul check interval, s")
    publish.add_argument("--deregister-after", type=float, default=60.0,
                         help="Consul reaps an indexer critical this long (s)")
    publish.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for passing")
    publish.set_defaults(func=_reporting_errors(_publish), command_label="shard publish")

    retire = commands.add_parser(
        "retire", help="stop and deregister every indexer of a shard",
        description="Stop the indexers of SHARD_ID gracefully (NOT_SERVING, deregister, drain) and "
        "deregister any replica of it still registered. The shard is marked retired in KV "
        "(meshserve/shards/retired/SHARD_ID), so an indexer that serves other shards too keeps it out "
        "and serves on; publishing the shard again removes the mark.",
        epilog=_ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    retire.add_argument("shard_id", metavar="SHARD_ID")
    retire.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")
    retire.add_argument("--grace", type=float, default=15.0, help="seconds before SIGKILL (default 15)")
    retire.set_defaults(func=_reporting_errors(_retire), command_label="shard retire")

    listing = commands.add_parser(
        "list", help="registered shards with the health of their replicas",
        epilog=_ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    listing.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_reporting_errors(_list), command_label="shard list")

    add_pipeline_command(subparsers)


def parse_duration(text: str) -> float:
    """`90`, `90s`, `5m`, `2h` or `7d` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 60s, 5m, 2h or 7d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return value


def add_pipeline_command(subparsers: Any) -> None:
    pipeline = subparsers.add_parser(
        "pipeline", help="the continuous shard pipeline",
        description="Keep the index fresh: new listings arrive, a delta shard is built and published "
        "for them, shards past the retention window are retired; a new embedder version gets a "
        "complete shard set of its own, published beside the old one.",
    )  # fmt: skip
    commands = pipeline.add_subparsers(dest="pipeline_command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="run the loop (or one cycle with --once)",
                              epilog=_ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--every", type=parse_duration, default=60.0, help="cycle period (default 60s)")
    run.add_argument("--once", action="store_true", help="run one cycle and exit")
    run.add_argument("--new-items", type=int, default=50, help="listings arriving per cycle (default 50)")
    run.add_argument("--retention", type=parse_duration, default=7 * 86400.0,
                     help="retire delta shards older than this (default 7d)")
    run.add_argument("--initial-shards", type=int, default=4,
                     help="shards covering the catalogue for a new embedder version (default 4)")
    run.add_argument("--replicas", type=int, default=1, help="indexers per shard (default 1)")
    run.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")
    run.set_defaults(func=_reporting_errors(_pipeline_run), command_label="pipeline run")


def _pipeline_run(args: argparse.Namespace) -> int:
    import time

    from meshserve.training.pipeline import Pipeline, PipelineConfig

    try:
        pipeline = Pipeline(PipelineConfig(registry=_registry(args), new_items=args.new_items,
                                           retention_s=args.retention, initial_shards=args.initial_shards,
                                           replicas=args.replicas))  # fmt: skip
    except ValueError as exc:
        print(f"meshserve pipeline run: {exc}", file=sys.stderr)
        return 2
    while True:
        started = time.monotonic()
        try:
            report = pipeline.run_once()
        except FileNotFoundError as exc:
            print(f"meshserve pipeline run: {exc}", file=sys.stderr)
            return 1
        print("\n".join(report.lines()), flush=True)
        if args.once:
            return 0
        time.sleep(max(0.0, args.every - (time.monotonic() - started)))


def _reporting_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Registry and shard problems end the command with one line saying what went wrong."""

    def run(args: argparse.Namespace) -> int:
        from meshserve.errors import MeshError

        try:
            return handler(args)
        except MeshError as exc:
            print(f"meshserve {args.command_label}: {exc}", file=sys.stderr)
            return 1

    return run


def _registry(args: argparse.Namespace) -> Any:
    from meshserve.registry.config import RegistryConfig

    return RegistryConfig.from_env(http_addr=args.consul)


def _build(args: argparse.Namespace) -> int:
    from meshserve.inference.shards import HnswParams
    from meshserve.training.shard_build import build_from_catalogue, parse_slice

    try:
        item_slice = parse_slice(args.items)
        params = HnswParams(M=args.M, ef_construction=args.ef_construction, ef=args.ef)
    except ValueError as exc:
        print(f"meshserve shard build: {exc}", file=sys.stderr)
        return 2
    manifest = build_from_catalogue(
        args.output, item_slice, embedder=args.embedder, index=args.index,
        shard=args.shard or args.output.name, generation=args.generation, params=params,
    )  # fmt: skip
    print(f"built shard {manifest.shard} of {manifest.index}: {manifest.count} items, dim {manifest.dim}, "
          f"embedder {manifest.embedder_version} → {args.output}")  # fmt: skip
    return 0


def _publish(args: argparse.Namespace) -> int:
    from meshserve.inference.shards import ShardError
    from meshserve.training.publish import PublishConfig, publish

    try:
        config = PublishConfig(registry=_registry(args), replicas=args.replicas, host=args.host,
                               check_interval_s=args.check_interval,
                               deregister_after_s=args.deregister_after, ready_timeout_s=args.timeout)
        manifest, records = publish(args.shard_dir, config)
    except (ValueError, ShardError, RuntimeError, TimeoutError) as exc:
        print(f"meshserve shard publish: {exc}", file=sys.stderr)
        return 1
    print(f"published shard {manifest.shard} of {manifest.index} (embedder {manifest.embedder_version}, "
          f"{manifest.count} items, dim {manifest.dim}, generation {manifest.generation}):")
    for record in records:
        print(f"  {record.instance_id}  {args.host}:{record.port}  pid {record.pid}  passing  "
              f"log {record.log}")
    return 0


def _retire(args: argparse.Namespace) -> int:
    from meshserve.training.publish import retire

    print(f"retiring shard {args.shard_id}", flush=True)
    retired = retire(args.shard_id, _registry(args), grace_s=args.grace)
    if not retired:
        print(f"meshserve shard retire: no indexer of shard {args.shard_id!r} is registered or running here",
              file=sys.stderr)
        return 1
    for instance_id in retired:
        print(f"retired {instance_id}")
    return 0


def _list(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from meshserve.training.publish import registered_indexers

    replicas = asyncio.run(registered_indexers(_registry(args)))
    rows = sorted(
        ({"index": r.instance.meta.get("index", ""), "shard": r.instance.meta.get("shard", ""),
          "embedder_version": r.instance.meta.get("embedder_version", ""),
          "count": int(r.instance.meta.get("count", "0") or 0), "id": r.instance.id,
          "target": r.instance.target, "status": r.status} for r in replicas),
        key=lambda row: (row["index"], row["embedder_version"], row["shard"], row["id"]),
    )  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no shards registered")
        return 0
    print(f"{'INDEX':<12} {'EMBEDDER':<20} {'SHARD':<16} {'ITEMS':>7}  {'STATUS':<9} {'TARGET':<22} ID")
    for row in rows:
        print(f"{row['index']:<12} {row['embedder_version']:<20} {row['shard']:<16} {row['count']:>7}  "
              f"{row['status']:<9} {row['target']:<22} {row['id']}")
    return 0
