"""The floor under a listing Check: the same fan-out with bare gRPC processes that do nothing.

Run:  nice -n 10 python bench/fanout_floor.py [--servers 4] [--delay-ms 20] [--rounds 300]

bench/guard.py measures Check against the slowest model alone. This bench takes the models and
the gateway away and keeps only their transport: N echo servers (grpc.aio on uvloop, like every
meshserve server; each answers its request after --delay-ms without using a core) and one relay
(the same server kind) that sends each request to all of them at once and answers when the last
has. The sides, alternating in order round by round:

  relay       client → relay → every echo server at once: what guard.py's check costs, minus our code
  relay-1     client → relay → the first echo server: the hop alone (guard.py's check-1)
  relay-2     client → relay → the first two: no more servers than cores (guard.py's check-2)
  parallel    client → every echo server at once, no relay (guard.py's parallel)
  echo-<i>    client → echo server i alone

With --cpu-calls N it also prints each process's CPU per call for N relay calls in a row. The
figure to compare with guard.py's goal (+3 ms) is relay p50 − the slowest echo p50: whatever this
leaves of the 3 ms is what the gateway's and the models' own code may spend.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard import Timings, free_port, process_cpu_s  # noqa: E402 - the sibling bench's helpers

SERVICE = "bench.Floor"
PAYLOAD = b"ceramic mug, blue glaze " * 12  # about what the gateway sends one listing model


def serve(role: str, port: int, delay_s: float, targets: Sequence[str]) -> None:
    """A child process: an echo server, or the relay over `targets`."""
    import uvloop

    async def main() -> None:
        server = grpc.aio.server()
        channels = [grpc.aio.insecure_channel(t) for t in targets]
        calls = [c.unary_unary(f"/{SERVICE}/Echo") for c in channels]

        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if delay_s:
                await asyncio.sleep(delay_s)
            return request

        async def relay(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            fan = int(request[:1] or b"0") or len(calls)  # first byte: how many echo servers to ask
            timeout = context.time_remaining()
            answers = await asyncio.gather(*(call(request, timeout=timeout) for call in calls[:fan]))
            return answers[-1]

        handler = grpc.unary_unary_rpc_method_handler(relay if role == "relay" else echo)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def start(role: str, port: int, delay_ms: float, targets: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--child", role, "--port", str(port), "--delay-ms",
                             str(delay_ms), *(["--targets", ",".join(targets)] if targets else [])],
                            start_new_session=True)  # fmt: skip


def stop(children: Sequence[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)


def ready(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        channel.unary_unary(f"/{SERVICE}/Echo")(b"1", timeout=10)


def run(servers: int, delay_ms: float, rounds: int, warmup: int, cpu_calls: int,
        say: Callable[[str], None]) -> dict[str, Timings]:  # fmt: skip
    echo_targets = [f"127.0.0.1:{free_port()}" for _ in range(servers)]
    relay_target = f"127.0.0.1:{free_port()}"
    children = [start("echo", int(t.rsplit(":", 1)[1]), delay_ms, []) for t in echo_targets]
    children.append(start("relay", int(relay_target.rsplit(":", 1)[1]), 0, echo_targets))
    channels: list[grpc.Channel] = []
    try:
        for target in [*echo_targets, relay_target]:
            ready(target)
        relay_channel = grpc.insecure_channel(relay_target)
        channels.append(relay_channel)
        relay = relay_channel.unary_unary(f"/{SERVICE}/Echo")
        echoes = []
        for target in echo_targets:
            channel = grpc.insecure_channel(target)
            channels.append(channel)
            echoes.append(channel.unary_unary(f"/{SERVICE}/Echo"))
        sides: dict[str, Callable[[], object]] = {
            "relay": lambda: relay(b"0" + PAYLOAD, timeout=10),
            "relay-1": lambda: relay(b"1" + PAYLOAD, timeout=10),
            "relay-2": lambda: relay(b"2" + PAYLOAD, timeout=10),
            "parallel": lambda: [f.result() for f in [e.future(PAYLOAD, timeout=10) for e in echoes]],
            **{f"echo-{i}": (lambda e=e: e(PAYLOAD, timeout=10)) for i, e in enumerate(echoes)},
        }
        say(f"{servers} echo servers ({delay_ms:g} ms each) and a relay up; {warmup} warm-up + {rounds} rounds")
        out = {name: Timings() for name in sides}
        names = list(sides)
        for n in range(warmup + rounds):
            for name in names if n % 2 == 0 else names[::-1]:
                started = time.perf_counter()
                sides[name]()
                if n >= warmup:
                    out[name].seconds.append(time.perf_counter() - started)
        if cpu_calls:
            before = [process_cpu_s(c.pid) for c in children]
            for _ in range(cpu_calls):
                sides["relay"]()
            spent = [process_cpu_s(c.pid) - b for c, b in zip(children, before, strict=True)]
            who = [f"echo-{i}" for i in range(servers)] + ["relay"]
            say(f"CPU ms per relay call ({cpu_calls} in a row): "
                + "  ".join(f"{w} {1000 * s / cpu_calls:.2f}" for w, s in zip(who, spent, strict=True)))
        return out
    finally:
        for channel in channels:
            channel.close()
        stop(children)


def report(out: dict[str, Timings]) -> str:
    lines = [f"{'side':<10} {'p50 ms':>8} {'p99 ms':>8}"]
    lines += [f"{name:<10} {1000 * t.p50:8.2f} {1000 * t.p99:8.2f}" for name, t in out.items()]
    alone = {name: t.p50 for name, t in out.items() if name.startswith("echo-")}
    slowest = max(alone, key=lambda name: alone[name])
    first_two = max(alone["echo-0"], alone["echo-1"])  # --servers is at least 2
    lines += [
        "",
        f"relay p50 − slowest echo p50 ({slowest}) = {1000 * (out['relay'].p50 - alone[slowest]):+.2f} ms  "
        "(guard.py's check − slowest, with no code of ours)",
        f"relay-1 p50 − echo-0 p50 = {1000 * (out['relay-1'].p50 - alone['echo-0']):+.2f} ms  (the hop alone)",
        f"relay-2 p50 − slower of echo-0/1 = {1000 * (out['relay-2'].p50 - first_two):+.2f} ms",
        f"parallel p50 − slowest echo p50 = {1000 * (out['parallel'].p50 - alone[slowest]):+.2f} ms  "
        "(the servers at once, no relay)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--servers", type=int, default=4, help="echo servers the relay fans out to (default 4)")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="each echo server answers after this long, without using a core (default 0)")
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed rounds first (default 30)")
    parser.add_argument("--cpu-calls", type=int, default=0, help="then this many relay calls with CPU per process")
    parser.add_argument("--child", choices=("echo", "relay"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--targets", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        serve(args.child, args.port, args.delay_ms / 1000.0, [t for t in args.targets.split(",") if t])
        return 0
    if args.servers < 2 or args.rounds < 2 or args.delay_ms < 0:
        parser.error("--servers ≥ 2, --rounds ≥ 2 and --delay-ms ≥ 0 are required")

    def say(line: str) -> None:
        print(line, flush=True)

    out = run(args.servers, args.delay_ms, args.rounds, args.warmup, args.cpu_calls, say)
    say("")
    say(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
