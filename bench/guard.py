"""Listing checks: Check latency vs the slowest single model alone and vs the models one after another.

Run:  nice -n 10 python bench/guard.py                      # tiny models trained into a temp dir (seconds)
      nice -n 10 python bench/guard.py --home ~/.meshserve  # the trained models there
      nice -n 10 python bench/guard.py --photo               # listings with a photo: the detector joins

One run starts a dev registry, the three violation classifiers, the shipping estimator (and with
--photo the detector), each `--threads 1`, and a gateway. Then, round by round, with the order of
the sides alternating so outside load on this shared machine falls on all of them alike:

  check       ListingGuard/Check through the gateway: every model at once (a fresh title each
              round, so the verdict cache never answers)
  check-1     the same Check restricted to one model (the last one: shipping, or the detector with
              --photo): what the gateway's hop costs without any fan-out
  check-2     restricted to the last two models: a fan-out with no more models than this machine
              has cores, so the models do not queue for a core behind each other
  <model>     that model's Predict called directly, alone, with the request the gateway sends
  sequential  every model's Predict called directly, one after another
  parallel    every model's Predict called directly, all at once (no gateway): what the models cost
              together on this machine's cores, the floor under check

With --model-delay-ms D every model server also waits D ms per call without using a core: models
that wait (a GPU, a remote store) rather than compute. The tiny models otherwise cost ~1–2 ms of CPU
each; on 2 cores shared with other work, calling them at once cannot beat the CPU they need
together, so without a delay the fan-out's gain is bounded by the cores, not by the gateway.

With --cpu-calls N, N calls of check, parallel and the last model alone follow in a row, each with
the CPU every process spent per call (/proc): what the fan-out asks of the 2 shared cores. A model
process that waited idle spends more per call than one called back to back (bench/idle_gap.py).

Goal: check p50 ≤ (slowest single model's p50) + 3 ms, i.e. the fan-out costs the gateway's hop and
not the sum of the models. The sequential figure shows what the parallel fan-out saves.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.v1 import listing_guard_pb2, listing_guard_pb2_grpc, prediction_pb2, prediction_pb2_grpc
from meshserve.wire import tensors

CLASSIFIERS = ("counterfeit", "prohibited", "contact_info")
SIZES = {"width_cm": 9.0, "height_cm": 10.0, "depth_cm": 9.0, "weight_kg": 0.4}


@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p99(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[max(1, min(len(ordered), int(-(-99 * len(ordered) // 100)))) - 1]


def free_port() -> int:
    """A free port below the kernel's ephemeral range (model servers bind port 0 meanwhile)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class Processes:
    """Children in their own process groups, all stopped by close()."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir = env, log_dir
        self.children: list[subprocess.Popen[bytes]] = []
        self.names: dict[subprocess.Popen[bytes], str] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen([sys.executable, "-m", "meshserve.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **self.env}, start_new_session=True)  # fmt: skip
        self.children.append(proc)
        self.names[proc] = name
        return proc

    def close(self) -> None:
        for proc in reversed(self.children):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.children):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def wait(predicate: Callable[[], bool], what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def serving(target: str, service: str = "") -> bool:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def model_request(model: str, title: str, photo: bytes | None) -> prediction_pb2.PredictRequest:
    """What the gateway sends each model for one listing (gateway/listing_wire.py)."""
    request = prediction_pb2.PredictRequest()
    inputs: dict[str, object]
    if model in CLASSIFIERS:
        inputs = {"title": [title.encode()], "description": [b"a sturdy mug, barely used"],
                  "price": np.array([12.0], np.float32), "category": [b"mug"]}  # fmt: skip
    elif model == "shipping":
        inputs = {"dims": np.array([[SIZES["width_cm"], SIZES["height_cm"], SIZES["depth_cm"]]], np.float32),
                  "weight_kg": np.array([SIZES["weight_kg"]], np.float32), "category": [b"mug"],
                  "title": [title.encode()]}  # fmt: skip
    else:
        assert photo is not None
        inputs = {"image": [photo]}
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tensors.tensor_from(value))  # type: ignore[arg-type]
    return request


def check_request(title: str, photo: bytes | None, models: Sequence[str] = ()) -> listing_guard_pb2.CheckRequest:
    listing = listing_guard_pb2.Listing(title=title, description="a sturdy mug, barely used", price_cents=1200,
                                        category="mug", attributes={k: str(v) for k, v in SIZES.items()},
                                        images=[photo] if photo else [])  # fmt: skip
    return listing_guard_pb2.CheckRequest(listing=listing, models=list(models))


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def ensure_home(home: Path | None, say: Callable[[str], None]) -> Path:
    if home is not None:
        return home
    from meshserve.training.train import TrainPlan, run

    home = Path(tempfile.mkdtemp(prefix="meshserve-bench-guard-"))
    say(f"training tiny models into {home} …")
    results, _ = run(TrainPlan(n_items=80, seed=7, home=home, progress=False, tiny=True))
    if not all(r.status == "trained" for r in results):
        raise RuntimeError(f"training failed: {results}")
    return home


def photo_of(home: Path) -> bytes:
    from meshserve.training.catalogue import load_items
    from meshserve.training.render import render_photo

    return render_photo(load_items(home)[0], 4_000_000_007).jpeg


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_report(procs: Processes, sides: dict[str, Callable[[str], object]], names: Sequence[str], calls: int) -> str:
    """CPU milliseconds per call in each process, for `calls` calls of each side in a row."""
    lines = [f"CPU ms per call ({calls} calls of each side in a row)"]
    for name in names:
        before = {child: process_cpu_s(child.pid) for child in procs.children}
        own_before = time.process_time()
        for n in range(calls):
            sides[name](f"ceramic mug, blue glaze, cpu round {n} side {name}")
        spent = {procs.names[child]: process_cpu_s(child.pid) - before[child] for child in procs.children}
        spent["bench"] = time.process_time() - own_before
        lines.append(f"  {name:<10} " + "  ".join(f"{who} {1000 * s / calls:.2f}" for who, s in spent.items() if s))
    return "\n".join(lines)


def run(home: Path, rounds: int, warmup: int, with_photo: bool, model_delay_ms: float, cpu_rounds: int,
        say: Callable[[str], None]) -> dict[str, Timings]:  # fmt: skip
    registry = f"127.0.0.1:{free_port()}"
    logs = Path(tempfile.mkdtemp(prefix="meshserve-bench-guard-logs-"))
    procs = Processes({"MESHSERVE_HOME": str(home), "CONSUL_HTTP_ADDR": f"http://{registry}"}, logs)
    channels: list[grpc.Channel] = []
    try:
        procs.start("registry", "registry", "dev", "--http-addr", registry)
        wait(lambda: urllib.request.urlopen(f"http://{registry}/v1/status/leader", timeout=1).status == 200,
             "registry")  # fmt: skip
        models = [*CLASSIFIERS, "shipping", *(["detector"] if with_photo else [])]
        targets = {}
        for model in models:
            port = free_port()
            kind_args = ["classifier", "--model", model] if model in CLASSIFIERS else [model]
            delay = ["--inject-delay-ms", str(model_delay_ms)] if model_delay_ms else []
            procs.start(model, "serve", *kind_args, "--port", str(port), "--threads", "1", "--check-interval", "0.5",
                        *delay)  # fmt: skip
            targets[model] = f"127.0.0.1:{port}"
        gateway = f"127.0.0.1:{free_port()}"
        procs.start("gateway", "gateway", "--addr", gateway, "--no-register")
        for model, target in targets.items():
            wait(lambda target=target: serving(target), model)
        wait(lambda: serving(gateway, "meshserve.v1.ListingGuard"), "gateway ListingGuard")
        photo = photo_of(home) if with_photo else None
        guard_channel = grpc.insecure_channel(gateway)
        channels.append(guard_channel)
        guard = listing_guard_pb2_grpc.ListingGuardStub(guard_channel)
        stubs = {}
        for model, target in targets.items():
            channel = grpc.insecure_channel(target)
            channels.append(channel)
            stubs[model] = prediction_pb2_grpc.PredictionServiceStub(channel)

        # Every model must answer OK through the gateway before anything is timed.
        def all_ok() -> bool:
            reply = guard.Check(check_request("warm up", photo), timeout=10)
            return len(reply.verdicts) == len(models) and all(v.status == 1 for v in reply.verdicts)

        wait(all_ok, "every model answering through the gateway", timeout=60)
        say(f"{len(models)} models and the gateway up; {warmup} warm-up + {rounds} timed rounds, order alternating")

        sides: dict[str, Callable[[str], object]] = {
            "check": lambda title: guard.Check(check_request(title, photo), timeout=10),
            "check-1": lambda title: guard.Check(check_request(title, photo, models[-1:]), timeout=10),
            "check-2": lambda title: guard.Check(check_request(title, photo, models[-2:]), timeout=10),
            "sequential": lambda title: [stubs[m].Predict(model_request(m, title, photo), timeout=10) for m in models],
            "parallel": lambda title: [f.result() for f in [stubs[m].Predict.future(model_request(m, title, photo),
                                                                                     timeout=10) for m in models]],
            **{m: (lambda title, m=m: stubs[m].Predict(model_request(m, title, photo), timeout=10)) for m in models},
        }
        out = {name: Timings() for name in sides}
        names = list(sides)
        for n in range(warmup + rounds):
            order = names if n % 2 == 0 else names[::-1]
            for name in order:
                title = f"ceramic mug, blue glaze, round {n} side {name}"
                seconds = timed(lambda name=name, title=title: sides[name](title))
                if n >= warmup:
                    out[name].seconds.append(seconds)
        if cpu_rounds:
            say("")
            say(cpu_report(procs, sides, ["check", "parallel", models[-1]], cpu_rounds))
        return out
    finally:
        for channel in channels:
            channel.close()
        procs.close()


def report(out: dict[str, Timings], with_photo: bool) -> str:
    models = [m for m in out if m not in ("check", "check-1", "check-2", "sequential", "parallel")]
    slowest = max(models, key=lambda m: out[m].p50)
    lines = [f"{'side':<14} {'p50 ms':>8} {'p99 ms':>8}"]
    for name, t in out.items():
        lines.append(f"{name:<14} {1000 * t.p50:8.2f} {1000 * t.p99:8.2f}")
    check, slow, seq = out["check"].p50, out[slowest].p50, out["sequential"].p50
    lines.append("")
    lines.append(f"slowest single model: {slowest} ({1000 * slow:.2f} ms p50)"
                 f"{'  [listings with a photo]' if with_photo else ''}")  # fmt: skip
    ok = check <= slow + 0.003
    lines.append(f"check p50 − slowest model p50 = {1000 * (check - slow):+.2f} ms  (goal ≤ +3 ms: "
                 f"{'met' if ok else 'NOT met'})")  # fmt: skip
    hop = out["check-1"].p50 - out[models[-1]].p50
    lines.append(f"the gateway hop alone (check-1 p50 − {models[-1]} p50) = {1000 * hop:+.2f} ms")
    pair = max(models[-2:], key=lambda m: out[m].p50)
    two = out["check-2"].p50 - out[pair].p50
    lines.append(f"two models, one per core (check-2 p50 − {pair} p50) = {1000 * two:+.2f} ms  (the goal's "
                 "form with no more models than cores)")  # fmt: skip
    together = out["parallel"].p50
    lines.append(f"the models called at once without the gateway (parallel p50 − slowest model p50) = "
                 f"{1000 * (together - slow):+.2f} ms; the gateway's share (check p50 − parallel p50) = "
                 f"{1000 * (check - together):+.2f} ms")  # fmt: skip
    lines.append(f"check p50 / sequential p50 = {check / seq:.2f}  ({1000 * seq:.2f} ms one after another)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--home", type=Path, help="MESHSERVE_HOME with trained models (default: train tiny ones)")
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed rounds first (default 20)")
    parser.add_argument("--photo", action="store_true", help="listings carry a photo, so the detector is asked too")
    parser.add_argument("--model-delay-ms", type=float, default=0.0,
                        help="every model server waits this long per call (--inject-delay-ms): models that "
                             "wait (a GPU, a remote store) rather than compute on the 2 shared cores")
    parser.add_argument("--cpu-calls", type=int, default=0,
                        help="after the timed rounds, this many calls of check, parallel and the last model in a "
                             "row, with the CPU each process spent per call (default 0: none)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")

    def say(line: str) -> None:
        print(line, flush=True)

    home = ensure_home(args.home, say)
    out = run(home, args.rounds, args.warmup, args.photo, args.model_delay_ms, args.cpu_calls, say)
    say("")
    say(report(out, args.photo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
