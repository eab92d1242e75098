"""`meshserve certs init|issue|show`: the mesh CA and its workload certificates on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_HELP = """\
The mesh CA lives in a PKI directory (default $MESHSERVE_HOME/pki):
  ca.crt, ca.key (0600)            the mesh certificate authority
  certs/<name>.crt, <name>.key     leaf certificates (keys 0600), ECDSA P-256, short-lived (default 24 h)
A service replica's certificate names its identity as a URI SAN, spiffe://meshserve/service/<service>,
and carries the service name as a DNS SAN, which is the TLS server name clients verify: a valid
certificate for meshserve-embedder cannot answer as meshserve-detector. Re-issuing a certificate
replaces it in place; servers reload it and new channels use it without restarts.
"""


def add_commands(subparsers: Any) -> None:
    certs = subparsers.add_parser("certs", help="the mesh CA: init, issue, show workload certificates",
                                  description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    certs.set_defaults(func=lambda args: (certs.print_help(), 2)[1])
    sub = certs.add_subparsers(dest="certs_command", metavar="COMMAND")

    init = sub.add_parser("init", help="create the mesh CA (kept if it exists)")
    _add_pki_dir(init)
    init.add_argument("--days", type=int, default=3650, help="CA validity in days (default 3650)")
    init.add_argument("--force", action="store_true", help="replace an existing CA (every leaf must be re-issued)")
    init.set_defaults(func=_init)

    issue = sub.add_parser("issue", help="issue (or renew) a leaf certificate signed by the mesh CA",
                           description="Kinds: --service S (identity spiffe://meshserve/service/S, DNS SAN S), "
                           "--agent (identity spiffe://meshserve/agent/NAME, SANs localhost, 127.0.0.1, ::1: the "
                           "registry dev agent), --client (identity spiffe://meshserve/client/NAME, no server names).")
    _add_pki_dir(issue)
    issue.add_argument("name", help="certificate name: certs/NAME.crt + NAME.key (for --service, default the service)",
                       nargs="?")  # fmt: skip
    kind = issue.add_mutually_exclusive_group(required=True)
    kind.add_argument("--service", help="a service replica, e.g. meshserve-detector")
    kind.add_argument("--agent", action="store_true", help="the registry agent's certificate")
    kind.add_argument("--client", action="store_true", help="a command-line client's certificate")
    issue.add_argument("--dns", action="append", default=[], help="extra DNS SAN (repeatable)")
    issue.add_argument("--ip", action="append", default=[], help="extra IP SAN (repeatable)")
    issue.add_argument("--hours", type=float, default=24.0, help="validity in hours (default 24)")
    issue.set_defaults(func=_issue)

    show = sub.add_parser("show", help="print the CA and leaf certificates (identity, names, expiry)")
    _add_pki_dir(show)
    show.add_argument("name", nargs="?", help="one leaf (default: the CA and every leaf)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_show)


def _add_pki_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pki", type=Path, help="PKI directory (default $MESHSERVE_HOME/pki)")


def _layout(args: argparse.Namespace) -> Any:
    from meshserve.pki.layout import PkiLayout, default_pki_dir

    return PkiLayout(args.pki or default_pki_dir())


def _init(args: argparse.Namespace) -> int:
    from meshserve.pki.authority import init_ca

    layout = _layout(args)
    created = init_ca(layout, days=args.days, force=args.force)
    print(f"{'created' if created else 'kept existing'} mesh CA: {layout.ca_cert}")
    return 0


def _issue(args: argparse.Namespace) -> int:
    from meshserve.pki.authority import agent_leaf, client_leaf, issue, service_leaf

    layout = _layout(args)
    extra = {"hours": args.hours, "dns": tuple(args.dns), "ips": tuple(args.ip)}
    try:
        if args.service:
            if args.name and args.name != args.service:
                print("meshserve certs issue: a service certificate is named after its service", file=sys.stderr)
                return 2
            spec = service_leaf(args.service, **extra)
        elif args.agent:
            spec = agent_leaf(args.name or "agent", **extra)
        else:
            if args.dns or args.ip:
                print("meshserve certs issue: a --client certificate carries no server names", file=sys.stderr)
                return 2
            spec = client_leaf(args.name or "cli", hours=args.hours)
        issue(layout, spec)
    except (ValueError, FileNotFoundError) as exc:
        print(f"meshserve certs issue: {exc}", file=sys.stderr)
        return 2
    print(f"issued {layout.cert(spec.name)} ({', '.join(spec.uris + spec.dns + spec.ips)}; {spec.hours:g} h)")
    return 0


def _show(args: argparse.Namespace) -> int:
    from meshserve.pki.inspect import describe_file

    layout = _layout(args)
    if not layout.has_ca():
        print(f"meshserve certs show: no mesh CA under {layout.root}: run `meshserve certs init`", file=sys.stderr)
        return 1
    names = [args.name] if args.name else layout.leaf_names()
    try:
        entries = {"ca": describe_file(layout.ca_cert)} | {n: describe_file(layout.cert(n)) for n in names}
    except (FileNotFoundError, ValueError) as exc:
        print(f"meshserve certs show: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({name: info.to_json() for name, info in entries.items()}, indent=2))
        return 0
    for name, info in entries.items():
        left = info.expires_in_s()
        state = "EXPIRED" if left <= 0 else f"expires in {left / 3600:.1f} h"
        names_ = ", ".join(info.uris + info.dns + info.ips) or info.subject
        print(f"{name:<24} {names_}  ({state}, {info.not_after:%Y-%m-%d %H:%M} UTC)")
    return 0
