"""A tiny gRPC server with only grpc.health.v1.Health, for check and watch tests.

    python -m tests.health_target --port P [--status SERVING|NOT_SERVING] [--service NAME]
                                  [--tls-cert CERT --tls-key KEY]

SIGUSR1 flips the status (SERVING <-> NOT_SERVING) of the whole server and of --service.
Prints "health target ready on PORT" once it serves (useful with --port 0).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

STATUSES = {"SERVING": health_pb2.HealthCheckResponse.SERVING,
            "NOT_SERVING": health_pb2.HealthCheckResponse.NOT_SERVING}


async def serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024)],
                             maximum_concurrent_rpcs=256)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{args.port}"
    if args.tls_cert:
        with open(args.tls_cert, "rb") as c, open(args.tls_key, "rb") as k:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    names = ["", args.service] if args.service else [""]
    current = {"status": STATUSES[args.status]}

    async def apply() -> None:
        for name in names:
            await servicer.set(name, current["status"])

    await apply()
    await server.start()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def flip() -> None:
        current["status"] = (health_pb2.HealthCheckResponse.NOT_SERVING
                             if current["status"] == health_pb2.HealthCheckResponse.SERVING
                             else health_pb2.HealthCheckResponse.SERVING)
        loop.create_task(apply())

    loop.add_signal_handler(signal.SIGUSR1, flip)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"health target ready on {port}", flush=True)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--status", choices=sorted(STATUSES), default="SERVING")
    parser.add_argument("--service", default="", help="also answer for this service name")
    parser.add_argument("--tls-cert", default="")
    parser.add_argument("--tls-key", default="")
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
