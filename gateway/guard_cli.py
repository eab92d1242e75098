"""`meshserve guard check` (one listing through the gateway's ListingGuard) and `meshserve config
get|set|validate FLOW [FILE]` (the flows' policy documents in Consul KV)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_GATEWAY = "127.0.0.1:50050"
FLOW_NAMES = ("listing-guard", "photo-search")  # gateway/flow_policy.py FLOWS (kept light to import)

_CONFIG_HELP = """
Documents live under the Consul KV key meshserve/config/<flow> as JSON. Fields left out keep the
built-in defaults. listing-guard:
  {"models": {"counterfeit": {"enabled": true, "review_threshold": 0.5, "block_threshold": 0.9,
                              "timeout_ms": 250, "missing": "fail-open"},  ... prohibited, contact_info,
              "shipping": {...}, "detector": {...}},
   "top_k": 3}
photo-search: {"top_k": 10, "min_detection_score": 0.3}
The gateway applies a new document within a second; one that does not validate is refused (the
last valid one stays in force; `meshserve status` shows why).

environment:
  CONSUL_HTTP_ADDR   Consul (or `meshserve registry dev`) address, default http://127.0.0.1:8500
  CONSUL_HTTP_TOKEN  Consul ACL token
"""


def add_commands(subparsers: Any) -> None:
    guard = subparsers.add_parser("guard", help="check a listing with every listing model",
                                  description="Listing checks through the gateway's meshserve.v1.ListingGuard.")
    actions = guard.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="one listing → allow / review / block, with every model's verdict",
                               description="Send one listing to the gateway's ListingGuard/Check and print "
                                           "the decision and every model's verdict.")  # fmt: skip
    check.add_argument("--title", required=True, help="listing title")
    check.add_argument("--description", default="", help="listing description")
    check.add_argument("--price", type=float, required=True, help="price in currency units, e.g. 12.50")
    check.add_argument("--category", default="", help="category, e.g. mug")
    check.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                       help="an attribute (repeat); width_cm, height_cm, depth_cm and weight_kg feed the "
                            "shipping-size estimate")  # fmt: skip
    check.add_argument("--photo", action="append", default=[], type=Path, metavar="FILE",
                       help="a JPEG/PNG/WebP photo of the listing (repeat, at most 8)")
    check.add_argument("--model", action="append", default=[], help="only this model (repeat; default: all)")
    check.add_argument("--gateway", default=os.environ.get("MESHSERVE_GATEWAY", DEFAULT_GATEWAY),
                       help=f"gateway HOST:PORT (default $MESHSERVE_GATEWAY or {DEFAULT_GATEWAY})")
    check.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds (default 5)")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(func=_check)

    config = subparsers.add_parser("config", help="read, validate and write the flows' live policies",
                                   description="The flows' policy documents in Consul KV (meshserve/config/<flow>).",
                                   epilog=_CONFIG_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = config.add_subparsers(dest="verb", metavar="VERB", required=True)
    get = verbs.add_parser("get", help="print a flow's document and its version (ModifyIndex)")
    get.add_argument("flow", choices=FLOW_NAMES, metavar="FLOW", help=" | ".join(FLOW_NAMES))
    get.add_argument("--json", action="store_true", help="print document, version and validity as JSON")
    get.set_defaults(func=_config_get)
    put = verbs.add_parser("set", help="validate FILE, then write it with check-and-set",
                           description="Validate FILE and write it as FLOW's document, only if nobody "
                                       "changed the stored one meanwhile (Consul's ?cas=).")  # fmt: skip
    put.add_argument("flow", choices=FLOW_NAMES, metavar="FLOW", help=" | ".join(FLOW_NAMES))
    put.add_argument("file", type=Path, metavar="FILE", help="the JSON document ('-' reads stdin)")
    put.add_argument("--cas", type=int,
                     help="write only if the stored document is still this version (from `config get`; "
                          "0: only if there is none). Default: the version read just before writing")
    put.set_defaults(func=_config_set)
    check_doc = verbs.add_parser("validate", help="validate FILE, or the stored document without FILE")
    check_doc.add_argument("flow", choices=FLOW_NAMES, metavar="FLOW", help=" | ".join(FLOW_NAMES))
    check_doc.add_argument("file", type=Path, nargs="?", metavar="FILE", help="the JSON document ('-': stdin)")
    check_doc.set_defaults(func=_config_validate)
    for parser in (get, put, check_doc):
        parser.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"meshserve {command}: {message}", file=sys.stderr)
    return code


def _check(args: argparse.Namespace) -> int:
    import json

    from meshserve.gateway.guard_client import CheckFailed, check_json, check_listing, check_request

    if not math.isfinite(args.price):
        return _fail("guard check", f"--price {args.price}: need a finite number", 2)
    attributes = {}
    for pair in args.attr:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            return _fail("guard check", f"--attr {pair!r} is not KEY=VALUE", 2)
        attributes[key] = value
    try:
        photos = [path.read_bytes() for path in args.photo]
    except OSError as exc:
        return _fail("guard check", f"cannot read {exc.filename}: {exc.strerror}", 2)
    request = check_request(args.title, args.description, round(args.price * 100), args.category, attributes,
                            photos, args.model)  # fmt: skip
    try:
        response = check_listing(args.gateway, request, args.timeout)
    except CheckFailed as exc:
        return _fail("guard check", str(exc))
    result = check_json(response)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['decision'].upper()}{'  (partial)' if result['partial'] else ''}  "
          f"policy {result['policy_version']}  trace {result['trace_id']}")
    for reason in result["reasons"]:
        print(f"  because {reason}")
    for v in result["verdicts"]:
        what = v["label"] or f"{v['score']:.3f} (review ≥ {v['review_threshold']:g}, block ≥ {v['block_threshold']:g})"
        extra = f"  {v['detail']}" if v["detail"] else ""
        print(f"  {v['model']:<13} {v['status']:<11} {v['version']:<24} {what}"
              f"{'  cached' if v['cached'] else ''}{extra}")  # fmt: skip
    if result["suggestions"]:
        print("  categories: " + ", ".join(f"{s['category']} {s['score']:.2f}" for s in result["suggestions"]))
    return 0


def _read(path: Path) -> str:
    return sys.stdin.read() if str(path) == "-" else path.read_text()


def _registry(args: argparse.Namespace) -> Any:
    from meshserve.registry.config import RegistryConfig

    return RegistryConfig.from_env(http_addr=args.consul)


def _stored_doc(args: argparse.Namespace) -> Any:
    """The flow's policy document as stored in KV, with its version and validation result."""
    import asyncio

    from meshserve.gateway.flow_store import read_doc
    from meshserve.registry.client import RegistryClient

    async def read() -> Any:
        async with RegistryClient(_registry(args)) as client:
            return await read_doc(client, args.flow)

    return asyncio.run(read())


def _config_get(args: argparse.Namespace) -> int:
    import json

    from meshserve.errors import MeshError

    try:
        doc = _stored_doc(args)
    except (MeshError, ValueError) as exc:
        return _fail("config get", str(exc))
    if args.json:
        print(json.dumps(doc.describe(), indent=2))
    elif doc.text is None:
        print(f"# {doc.key}: no document; the built-in defaults apply", file=sys.stderr)
    else:
        state = "valid" if doc.error is None else f"INVALID ({doc.error})"
        print(f"# {doc.key} version {doc.modify_index}, {state}", file=sys.stderr)
        print(doc.text)
    return 0


def _config_set(args: argparse.Namespace) -> int:
    import asyncio

    from meshserve.errors import MeshError
    from meshserve.gateway.flow_store import write_doc
    from meshserve.registry.client import RegistryClient

    try:
        text = _read(args.file)
    except OSError as exc:
        return _fail("config set", f"cannot read {args.file}: {exc.strerror}", 2)

    async def write() -> int:
        async with RegistryClient(_registry(args)) as client:
            return await write_doc(client, args.flow, text, args.cas)

    try:
        version = asyncio.run(write())
    except (MeshError, ValueError) as exc:
        return _fail("config set", str(exc))
    print(f"{args.flow}: version {version} written")
    return 0


def _config_validate(args: argparse.Namespace) -> int:
    from meshserve.errors import MeshError
    from meshserve.gateway.flow_policy import PolicyError, validate

    if args.file is not None:
        try:
            text = _read(args.file)
        except OSError as exc:
            return _fail("config validate", f"cannot read {args.file}: {exc.strerror}", 2)
        try:
            validate(args.flow, text)
        except PolicyError as exc:
            return _fail("config validate", str(exc))
        print(f"{args.flow}: valid")
        return 0

    try:
        doc = _stored_doc(args)
    except (MeshError, ValueError) as exc:
        return _fail("config validate", str(exc))
    if doc.error is not None:
        return _fail("config validate", f"{doc.key} version {doc.version}: {doc.error}")
    print(f"{args.flow}: version {doc.version} valid")
    return 0
