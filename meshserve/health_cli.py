"""`meshserve health HOST:PORT`: ask a server's grpc.health.v1 service; exit 0 only on SERVING."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from meshserve.rpc.tls_files import TlsFiles, add_tls_arguments, tls_from_args

# Docker reserves exit code 2 for HEALTHCHECK commands, so every unhealthy outcome is 1.
EXIT_SERVING = 0
EXIT_UNHEALTHY = 1

_EPILOG = """
exit status: 0 when the server answers SERVING for the service; 1 for anything else
(NOT_SERVING, SERVICE_UNKNOWN, unreachable, deadline exceeded). Meant for Docker HEALTHCHECK,
compose healthchecks and scripts; Kubernetes should use its native `grpc:` probe instead.
"""


@dataclass(frozen=True)
class HealthTarget:
    """Where to ask and about what: host, port, the health service name ("" = whole server)."""

    host: str
    port: int
    service: str = ""
    timeout_s: float = 2.0
    tls: TlsFiles | None = None  # mTLS with these files (None: plaintext)
    server_name: str = ""  # the name the server's certificate must carry (default: the one in tls.cert)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` → (host, port); ValueError saying what is wrong otherwise."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} has no port; give HOST:PORT, e.g. 127.0.0.1:50051")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 host in brackets, e.g. [::1]:50051")
    if not host:
        raise ValueError(f"{text!r} has no host; give HOST:PORT, e.g. 127.0.0.1:50051")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be a number in 1..65535")
    return host, int(port_text)


def check(target: HealthTarget) -> tuple[bool, str]:
    """One Health/Check call within the timeout: (serving?, what was seen)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # A proxy from the environment must never sit between a probe and the server it probes.
    from meshserve.rpc.channel_options import client_options
    from meshserve.rpc.tls import channel as tls_channel

    options = [*client_options(), ("grpc.enable_http_proxy", 0)]
    with tls_channel(target.address, _server_name(target), options, target.tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=target.service), timeout=target.timeout_s
            )
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            details = exc.details()  # type: ignore[attr-defined]
            name = code.name if code is not None else "UNKNOWN"
            return False, f"{name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def _server_name(target: HealthTarget) -> str:
    """A server probing itself (Docker HEALTHCHECK) verifies the service name its own certificate carries."""
    if target.server_name or target.tls is None:
        return target.server_name
    from meshserve.pki.inspect import describe_file

    names = describe_file(target.tls.cert).dns
    return names[0] if names else ""


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "health",
        help="check a server's gRPC health service (exit 0 only on SERVING)",
        description="Call grpc.health.v1.Health/Check on HOST:PORT and report the status.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="HOST:PORT", help="the server, e.g. 127.0.0.1:50051")
    parser.add_argument(
        "--service",
        default="",
        help="health service name, e.g. meshserve.v1.PredictionService (default: whole server)",
    )
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)"
    )
    add_tls_arguments(parser)
    parser.add_argument("--tls-server-name", default="",
                        help="with mTLS: the service name the server's certificate must carry (default: the first "
                        "DNS name in --tls-cert, i.e. a server checking itself)")
    parser.set_defaults(func=_health)


def _health(args: argparse.Namespace) -> int:
    try:
        host, port = parse_target(args.target)
        if not args.timeout > 0:
            raise ValueError(f"--timeout must be > 0, got {args.timeout}")
        tls = tls_from_args(args)
    except ValueError as exc:
        print(f"meshserve health: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    target = HealthTarget(host=host, port=port, service=args.service, timeout_s=args.timeout, tls=tls,
                          server_name=args.tls_server_name)  # fmt: skip
    serving, seen = check(target)
    what = f"{target.address}" + (f" service {target.service!r}" if target.service else "")
    if serving:
        print(f"{what}: {seen}")
        return EXIT_SERVING
    print(f"meshserve health: {what}: {seen}", file=sys.stderr)
    return EXIT_UNHEALTHY
