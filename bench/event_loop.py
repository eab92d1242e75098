"""The servers' event loop: uvloop vs asyncio's own, server CPU and round trip per Predict.

Run:  nice -n 10 python bench/event_loop.py [--calls 4000]

Two identity servers (`--model-thread`, the path every real model takes), one with
MESHSERVE_EVENT_LOOP=asyncio and one with uvloop, called one after another from this process over
kept channels in alternating blocks, so outside load on this shared machine falls on both alike.
Printed per loop: round-trip p50/p99 and the server's CPU per call (from /proc, user + system).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshserve.v1 import prediction_pb2, prediction_pb2_grpc  # noqa: E402
from meshserve.wire import tensors  # noqa: E402
from tests.support import free_port  # noqa: E402

LOOPS = ("asyncio", "uvloop")
BLOCK = 200  # calls per block


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_identity(loop: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshserve", "serve", "identity", "--no-register", "--port", str(port),
         "--model-thread", "--max-cols", "256"],
        env={**os.environ, "MESHSERVE_EVENT_LOOP": loop}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_answering(stub: prediction_pb2_grpc.PredictionServiceStub, request: prediction_pb2.PredictRequest) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            stub.Predict(request, timeout=2)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000, help="timed calls per loop (default 4000)")
    args = parser.parse_args()
    request = prediction_pb2.PredictRequest(model_name="identity")
    tensors.encode_tensor(np.ones((1, 256), np.float32), request.inputs["x"])
    servers, stubs, channels = {}, {}, []
    try:
        for loop in LOOPS:
            port = free_port()
            servers[loop] = start_identity(loop, port)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            channels.append(channel)
            stubs[loop] = prediction_pb2_grpc.PredictionServiceStub(channel)
        for loop in LOOPS:
            wait_answering(stubs[loop], request)
            for _ in range(BLOCK):  # warm-up
                stubs[loop].Predict(request, timeout=5)
        seconds: dict[str, list[float]] = {loop: [] for loop in LOOPS}
        cpu: dict[str, float] = dict.fromkeys(LOOPS, 0.0)
        for block in range(max(1, args.calls // BLOCK)):
            for loop in LOOPS if block % 2 == 0 else LOOPS[::-1]:
                before = cpu_seconds(servers[loop].pid)
                for _ in range(BLOCK):
                    started = time.perf_counter()
                    stubs[loop].Predict(request, timeout=5)
                    seconds[loop].append(time.perf_counter() - started)
                cpu[loop] += cpu_seconds(servers[loop].pid) - before
        print(f"identity Predict (1×256 float32, model thread), {len(seconds[LOOPS[0]])} calls per loop, interleaved")
        print(f"{'loop':10s}{'p50 ms':>10s}{'p99 ms':>10s}{'server CPU ms/call':>22s}")
        for loop in LOOPS:
            ordered = sorted(seconds[loop])
            p99 = ordered[int(0.99 * (len(ordered) - 1))]
            per_call = 1000 * cpu[loop] / len(ordered)
            print(f"{loop:10s}{1000 * statistics.median(ordered):10.3f}{1000 * p99:10.3f}{per_call:22.3f}")
        print(f"uvloop / asyncio server CPU per call: {cpu['uvloop'] / cpu['asyncio']:.2f}")
    finally:
        for channel in channels:
            channel.close()
        for server in servers.values():
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
