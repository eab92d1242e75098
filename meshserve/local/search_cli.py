"""`meshserve search`: one photo through the gateway's PhotoSearch, printed or drawn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_GATEWAY = "127.0.0.1:50050"


def add_commands(subparsers: Any) -> None:
    search = subparsers.add_parser(
        "search", help="search the catalogue with a photo",
        description="Send IMAGE to the gateway's PhotoSearch and print the detections and their matches.",
    )  # fmt: skip
    search.add_argument("image", type=Path, metavar="IMAGE", help="a JPEG, PNG or WebP photo")
    search.add_argument("--gateway", default=os.environ.get("MESHSERVE_GATEWAY", DEFAULT_GATEWAY),
                        help=f"gateway HOST:PORT (default $MESHSERVE_GATEWAY or {DEFAULT_GATEWAY})")
    search.add_argument("--top-k", type=int, default=10, help="matches per detection (default 10)")
    search.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds (default 10)")
    search.add_argument("--min-score", type=float, default=0.0,
                        help="drop detections scoring below this (default 0: the gateway's threshold)")
    search.add_argument("--json", action="store_true", help="print the result as JSON")
    search.add_argument("--show", type=Path, metavar="OUT_PNG",
                        help="also draw the query, its boxes and top matches into this PNG")
    search.set_defaults(func=_search)


def _search(args: argparse.Namespace) -> int:
    import json

    from meshserve.gateway.client import SearchFailed, result_json, search_photo

    try:
        image = args.image.read_bytes()
    except OSError as exc:
        print(f"meshserve search: cannot read {args.image}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        response = search_photo(args.gateway, image, top_k=args.top_k, timeout=args.timeout, min_score=args.min_score)
    except SearchFailed as exc:
        print(f"meshserve search: {exc}", file=sys.stderr)
        return 1
    if args.show:
        from meshserve.local.picture import draw_results

        draw_results([(image, response)], args.show)
    if args.json:
        print(json.dumps(result_json(response), indent=2))
        return 0
    result = result_json(response)
    print(f"coverage {result['coverage']:.2f}  versions {result['versions']}  trace {result['trace_id']}")
    for detection in response.detections:
        b = detection.box
        print(f"{detection.label} {detection.score:.2f} [{b.x_min:.0f}, {b.y_min:.0f}, {b.x_max:.0f}, {b.y_max:.0f}]")
        for m in detection.matches:
            print(f"    {m.score:.3f}  item {m.item_id:>6}  shard {m.shard:<10} {m.attributes.get('title', '')}")
    if args.show:
        print(f"picture: {args.show}")
    return 0
