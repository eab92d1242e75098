"""The `meshserve registry` command family: `registry dev` runs the Consul-compatible dev agent."""

from __future__ import annotations

import argparse
from pathlib import Path

DEV_HELP = """\
Run a Consul-HTTP-API-compatible dev agent (like `consul agent -dev`): the subset of
Consul's API listed in docs/architecture.md, answered so that Consul clients cannot tell the difference.
It runs gRPC, HTTP, TCP and TTL checks itself and keeps its state in memory unless
--data-dir is given (ACL policies and tokens included).

ACLs like Consul's (default deny) with --acl-enabled (bootstrap with `meshserve acl bootstrap`)
or --acl-token (the initial management token). HTTPS on --https-addr with --cert-file and
--key-file (`--http-addr off` closes plain HTTP); --verify-incoming requires client
certificates signed by --ca-file.

--reap-interval, --min-deregister-after and --min-check-interval default to Consul's own
values (30s, 1m, 1s). Shorter values are a dev-agent allowance for tests; real Consul
does not accept them.
"""


def _duration(text: str) -> float:
    from meshserve.registry.dev.schema import parse_go_duration

    try:
        seconds = parse_go_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (use e.g. 500ms, 10s, 1m)") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return seconds


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port, e.g. 127.0.0.1:8500")
    return host.strip("[]") or "127.0.0.1", int(port)


def _host_port_or_off(text: str) -> tuple[str, int] | None:
    return None if text == "off" else _host_port(text)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    registry = subparsers.add_parser("registry", help="service registry (Consul) tools")
    sub = registry.add_subparsers(dest="registry_command", metavar="COMMAND")
    registry.set_defaults(func=lambda args: (registry.print_help(), 2)[1])
    dev = sub.add_parser(
        "dev", help="run the Consul-compatible dev agent", description=DEV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dev.add_argument("--http-addr", type=_host_port_or_off, default=("127.0.0.1", 8500),
                     help="address to listen on (default 127.0.0.1:8500; 'off': HTTPS only)")
    dev.add_argument("--https-addr", type=_host_port, default=None,
                     help="also serve HTTPS here (Consul's ports.https), with --cert-file/--key-file")
    dev.add_argument("--acl-token", default=None,
                     help="enable ACLs with this initial management token (it may do anything); requests "
                     "without a token are anonymous (writes refused, list reads filtered)")
    dev.add_argument("--acl-enabled", action="store_true",
                     help="enable ACLs without a management token: get one with PUT /v1/acl/bootstrap "
                     "(`meshserve acl bootstrap`)")
    dev.add_argument("--acl-default-policy", choices=("deny", "allow"), default="deny",
                     help="what a token may do where no rule says (Consul's acl.default_policy; default deny)")
    # Consul's tls.defaults: one identity for the HTTPS listener and for TLS gRPC checks
    for flag, what in (("--ca-file", "CA certificate (PEM): verifies HTTPS clients (--verify-incoming) "
                                     "and TLS gRPC check targets"),
                       ("--cert-file", "certificate (PEM) served on --https-addr and presented to TLS gRPC check "
                                       "targets"),
                       ("--key-file", "private key (PEM) of --cert-file")):
        dev.add_argument(flag, type=Path, default=None, help=what)
    dev.add_argument("--verify-incoming", action="store_true",
                     help="HTTPS clients must present a certificate signed by --ca-file (Consul's verify_incoming)")
    dev.add_argument("--data-dir", type=Path, default=None,
                     help="persist state here and restore it on start (default: memory only)")
    dev.add_argument("--node-name", default="", help="node name (default: the host name)")
    dev.add_argument("--datacenter", default="dc1", help="datacenter name (default dc1)")
    dev.add_argument("--reap-interval", type=_duration, default=30.0,
                     help="how often critical services are reaped (Consul: 30s)")
    dev.add_argument("--min-deregister-after", type=_duration, default=60.0,
                     help="floor for DeregisterCriticalServiceAfter (Consul: 1m)")
    dev.add_argument("--min-check-interval", type=_duration, default=1.0,
                     help="floor for check intervals (Consul: 1s)")
    dev.set_defaults(func=run_dev)


def run_dev(args: argparse.Namespace) -> int:
    import asyncio

    from meshserve.registry.dev.agent import AgentConfig
    from meshserve.registry.dev.serve import serve

    host, port = args.http_addr or ("127.0.0.1", 8500)
    config = AgentConfig(
        host=host,
        port=port,
        http_enabled=args.http_addr is not None,
        https_addr=args.https_addr,
        acl_token=args.acl_token or None,
        acl_enabled=args.acl_enabled,
        acl_default_policy=args.acl_default_policy,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        verify_incoming=args.verify_incoming,
        data_dir=args.data_dir,
        node_name=args.node_name,
        datacenter=args.datacenter,
        reap_interval=max(args.reap_interval, 0.05),
        min_deregister_after=args.min_deregister_after,
        min_check_interval=args.min_check_interval,
    )
    asyncio.run(serve(config))
    return 0
