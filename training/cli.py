"""`meshserve catalog …` (and, from other hands, `train`): the training room's commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register every command of the training room; one helper per command family."""
    add_catalog_commands(subparsers)


def add_catalog_commands(subparsers: argparse._SubParsersAction) -> None:
    catalog = subparsers.add_parser("catalog", help="the synthetic catalogue (the warehouse)")
    sub = catalog.add_subparsers(dest="catalog_command", metavar="ACTION")
    catalog.set_defaults(func=lambda args: (catalog.print_help(), 2)[1])

    build = sub.add_parser("build", help="generate the catalogue into $MESHSERVE_HOME")
    build.add_argument("--items", type=int, default=None, help="number of items (default 2000)")
    build.add_argument("--seed", type=int, default=None, help="data seed (default 1234)")
    build.set_defaults(func=_cmd_build)

    items = sub.add_parser("items", help="list the catalogue's items")
    items.add_argument("--json", action="store_true", help="one JSON object per line")
    items.add_argument("--category", default=None, help="only this category")
    items.add_argument("--limit", type=int, default=None, help="at most this many items")
    items.set_defaults(func=_cmd_items)

    render = sub.add_parser("render", help="render one photo of an item, deterministically")
    render.add_argument("item_id", type=int, metavar="ITEM_ID")
    render.add_argument("--seed", type=int, required=True, help="photo seed")
    render.add_argument("-o", "--output", required=True, help="where to write the JPEG")
    render.add_argument("--size", type=int, default=None, help="photo side in pixels (160)")
    render.add_argument("--json", action="store_true", help="print the ground truth as JSON")
    render.set_defaults(func=_cmd_render)


def _ensure_catalogue() -> None:
    from meshserve.training.catalogue import build_catalogue
    from meshserve.warehouse import catalogue_path

    if not catalogue_path().is_file():
        print(f"no catalogue at {catalogue_path()}: building the default one", file=sys.stderr)
        build_catalogue()


def _cmd_build(args: argparse.Namespace) -> int:
    from meshserve.training.catalogue import DEFAULT_ITEMS, DEFAULT_SEED, build_catalogue

    n = args.items if args.items is not None else DEFAULT_ITEMS
    seed = args.seed if args.seed is not None else DEFAULT_SEED
    if n < 1:
        print(f"error: --items must be at least 1, got {n}", file=sys.stderr)
        return 2
    path = build_catalogue(n, seed)
    print(f"wrote {n} items (seed {seed}) to {path}")
    return 0


def _cmd_items(args: argparse.Namespace) -> int:
    from meshserve.errors import MeshError
    from meshserve.training.catalogue import load_items

    _ensure_catalogue()
    try:
        items = load_items(category=args.category, limit=args.limit)
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        for item in items:
            if args.json:
                print(json.dumps(item.to_dict(), sort_keys=True))
            else:
                flags = ",".join(item.violations) or "-"
                print(f"{item.item_id:6d}  {item.category:<10s} {item.price:9.2f}  "
                      f"{item.shipping_size:<8s} {flags:<24s} {item.title}")
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from meshserve.errors import MeshError
    from meshserve.inference.vocabulary import CATEGORY_NAMES
    from meshserve.training.catalogue import get_item
    from meshserve.training.render import RenderConfig, render_photo

    _ensure_catalogue()
    try:
        item = get_item(args.item_id)
        cfg = RenderConfig() if args.size is None else RenderConfig(size=args.size)
        photo = render_photo(item, args.seed, cfg)
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(photo.jpeg)
    truth = [
        {"item_id": int(i), "category": CATEGORY_NAMES[int(c)], "box": [float(v) for v in b]}
        for i, c, b in zip(photo.item_ids, photo.labels, photo.boxes, strict=True)
    ]
    if args.json:
        print(json.dumps({"path": str(out), "seed": args.seed, "objects": truth}))
    else:
        for t in truth:
            print(f"{out}: item {t['item_id']} {t['category']} box {t['box']}")
    return 0
