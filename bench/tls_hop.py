"""What one gRPC hop pays for mTLS by payload size, and which gRPC options change it (issue #17's 600 KB hop).

Run: nice -n 10 python bench/tls_hop.py [--quick] [--only NAME,NAME]

A bare grpc.aio echo server in its own process, called over a kept channel from another: plaintext and mTLS
(the mesh CA's certificates) side by side, in alternating blocks, for 1 KB and 600 KB. Each variant passes one
set of gRPC args to both sides (server and channel) of both servers, and/or turns on gRPC core experiments
(GRPC_EXPERIMENTS) in all three processes, so the plaintext column is that variant's own baseline.
Also printed: what encrypting the bytes alone costs (AES-128-GCM and ChaCha20-Poly1305 through the
`cryptography` package's OpenSSL), times the four passes a round trip makes (the client seals the request,
the server opens it, seals the reply, the client opens it): the floor any TLS adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import free_port  # noqa: E402

ECHO = "/bench.Echo/Echo"
LIMIT = 16 << 20
SIZES = (("1 KB", 1024, 20, 100), ("600 KB", 600_000, 10, 30))
MB = 1 << 20
# name → (gRPC args for both sides, GRPC_EXPERIMENTS for both processes)
VARIANTS: dict[str, tuple[dict[str, int], str]] = {
    "default": ({}, ""),
    "tsi frame 4 KB": ({"grpc.tsi.max_frame_size": 4096}, ""),
    "tsi frame 1 MB": ({"grpc.tsi.max_frame_size": MB}, ""),
    "http2 frame 1 MB": ({"grpc.http2.max_frame_size": MB}, ""),
    "write buffer 1 MB": ({"grpc.http2.write_buffer_size": MB}, ""),
    "tcp read chunk 1 MB": ({"grpc.experimental.tcp_read_chunk_size": MB,
                             "grpc.experimental.tcp_min_read_chunk_size": MB,
                             "grpc.experimental.tcp_max_read_chunk_size": MB}, ""),
    "read coalescing": ({}, "secure_endpoint_read_coalescing"),
    "pipelined read": ({}, "pipelined_read_secure_endpoint"),
    "offload large r/w": ({"grpc.secure_endpoint.decryption_offload_threshold": 64 << 10,
                           "grpc.secure_endpoint.encryption_offload_threshold": 64 << 10},
                          "secure_endpoint_offload_large_reads,secure_endpoint_offload_large_writes"),
    "tcp frame size tuning": ({}, "tcp_frame_size_tuning"),
}  # fmt: skip


# -- the server process ----------------------------------------------------------------------


async def _serve(port: int, args: dict[str, int], tls: list[str] | None) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    options = [("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT), *args.items()]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    if tls is None:
        server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        ca, cert, key = (Path(p).read_bytes() for p in tls)
        credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
    await server.start()
    await server.wait_for_termination()


def _start_server(port: int, args: dict[str, int], tls: list[str] | None) -> subprocess.Popen[bytes]:
    spec = json.dumps({"port": port, "args": args, "tls": tls})
    return subprocess.Popen([sys.executable, __file__, "--serve", spec], stderr=subprocess.PIPE)


# -- the client side ---------------------------------------------------------------------------


async def _latencies(call: Any, body: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await call(body, timeout=10)
        out.append(time.perf_counter() - started)
    return out


async def _ready(call: Any, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await call(b"x", timeout=2)
            return
        except grpc.aio.AioRpcError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                why = proc.stderr.read().decode() if proc.poll() is not None and proc.stderr else str(exc)
                raise RuntimeError(f"echo server not ready: {why}") from exc
            await asyncio.sleep(0.1)


async def measure(name: str, args: dict[str, int], pki: dict[str, Path], quick: bool) -> list[str]:
    plain_port, tls_port = free_port(), free_port()
    files = [str(pki["ca"]), str(pki["server_cert"]), str(pki["server_key"])]
    servers = [_start_server(plain_port, args, None), _start_server(tls_port, args, files)]
    options = [("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT), *args.items()]
    credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), pki["client_key"].read_bytes(),
                                               pki["client_cert"].read_bytes())  # fmt: skip
    lines = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plain_port}", options=options) as plain, \
                grpc.aio.secure_channel(f"127.0.0.1:{tls_port}", credentials,
                                        options=[*options, ("grpc.ssl_target_name_override", "bench-echo")]) as tls:
            calls = {"off": plain.unary_unary(ECHO), "on": tls.unary_unary(ECHO)}  # fmt: skip
            for call, proc in zip(calls.values(), servers, strict=True):
                await _ready(call, proc)
            for label, nbytes, blocks, per_block in SIZES:
                blocks = max(2, blocks // 5) if quick else blocks
                body = os.urandom(nbytes)
                samples: dict[str, list[float]] = {side: [] for side in calls}
                for call in calls.values():
                    await _latencies(call, body, 20)  # warm
                for _ in range(blocks):  # alternate, so load from elsewhere hits both sides alike
                    for side, call in calls.items():
                        samples[side] += await _latencies(call, body, per_block)
                off = np.percentile(samples["off"], [50, 99]) * 1e3
                on = np.percentile(samples["on"], [50, 99]) * 1e3
                lines.append(f"  {name:<20} {label:>6}  {off[0]:7.3f} {on[0]:7.3f}  {on[0] - off[0]:+7.3f} "
                             f"{(on[0] / off[0] - 1) * 100:+6.1f} %   {off[1]:7.3f} {on[1]:7.3f}   "
                             f"n={len(samples['off'])}")  # fmt: skip
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=15)
    return lines


def crypto_floor(nbytes: int = 600_000, rounds: int = 30) -> list[str]:
    """The time to seal `nbytes` once with each AEAD, ×4 for a round trip's passes."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    data, lines = os.urandom(nbytes), []
    for name, aead in (("AES-128-GCM", AESGCM(AESGCM.generate_key(128))),
                       ("ChaCha20-Poly1305", ChaCha20Poly1305(ChaCha20Poly1305.generate_key()))):  # fmt: skip
        record = 16_384  # TLS seals at most 16 KB of plaintext per record
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            for at in range(0, nbytes, record):
                aead.encrypt(b"\0" * 12, data[at:at + record], None)
            times.append(time.perf_counter() - started)
        one = float(np.median(times)) * 1e3
        lines.append(f"  {name:<18} seal 600 KB in 16 KB records {one:6.3f} ms  → ×4 per round trip "
                     f"{4 * one:6.3f} ms ({nbytes / one / 1e6:.2f} GB/s)")  # fmt: skip
    return lines


def _pki(directory: Path) -> None:
    from meshserve.pki.authority import client_leaf, init_ca, issue, service_leaf
    from meshserve.pki.layout import PkiLayout

    layout = PkiLayout(directory)
    init_ca(layout)
    issue(layout, service_leaf("bench-echo"))
    issue(layout, client_leaf("cli"))


def _pki_files(directory: Path) -> dict[str, Path]:
    from meshserve.pki.layout import PkiLayout

    layout = PkiLayout(directory)
    return {"ca": layout.ca_cert, "server_cert": layout.cert("bench-echo"), "server_key": layout.key("bench-echo"),
            "client_cert": layout.cert("cli"), "client_key": layout.key("cli")}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer blocks (a smoke run)")
    parser.add_argument("--only", help=f"variants, comma-separated (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        spec = json.loads(args.serve)
        asyncio.run(_serve(spec["port"], spec["args"], spec["tls"]))
        return 0
    if args.variant:  # in a process of its own: GRPC_EXPERIMENTS is read once, when gRPC starts
        for line in asyncio.run(measure(args.variant, VARIANTS[args.variant][0], _pki_files(args.pki), args.quick)):
            print(line, flush=True)
        return 0
    chosen = [v.strip() for v in args.only.split(",")] if args.only else list(VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    print("the floor: the bytes' encryption alone")
    for line in crypto_floor():
        print(line)
    print("\none hop, bare grpc.aio echo, kept channel, ms   p50 off  p50 on    added   ratio    p99 off p99 on")
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        _pki(Path(tmp))
        for name in chosen:
            experiments = VARIANTS[name][1]
            env = {**os.environ, **({"GRPC_EXPERIMENTS": experiments} if experiments else {})}
            argv = [sys.executable, __file__, "--variant", name, "--pki", tmp, *(["--quick"] if args.quick else [])]
            done = subprocess.run(argv, env=env, text=True, capture_output=True, timeout=900)
            print(done.stdout.rstrip() if done.returncode == 0 else f"  {name}: failed: {done.stderr[-800:]}",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
