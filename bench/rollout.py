"""Rollouts: what a traffic policy in force (canary + shadow) adds to the gateway's latency, vs no policy.

Run:  nice -n 10 python bench/rollout.py                      # tiny models trained into a temp dir
      nice -n 10 python bench/rollout.py --home ~/.meshserve  # the trained models there

One run starts a dev registry, two detector versions (the same weights, the second under another
version id), each `--threads 1`, and a gateway. It times ListingGuard/Check restricted to the
detector (one photo), in blocks that alternate between the two sides, so outside load on this
shared machine falls on both alike:

  none     no rollout document for the detector: the newest version answers every call
  canary   meshserve/rollout/detector with a 10 % canary: per-request arm choice and per-version
           metrics, what the gateway itself adds
  policy   the same with 50 % shadow of the stable answers: the shadow copies run in the
           background, but the candidate's model computes on the same 2 shared cores

Between blocks the document is written or deleted and the bench waits until the gateway reports
it in force (meshserve_gateway_rollout_policy_modify_index). Goal: canary p50 − none p50 ≤ 1 ms (the
gateway's own cost); policy − canary is the shadow's, mostly the candidate's CPU on this machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from guard import Processes, Timings, check_request, ensure_home, free_port, photo_of, serving, timed, wait

from meshserve.v1 import listing_guard_pb2_grpc

KEY = "meshserve/rollout/detector"


def candidate_copy(home: Path, out: Path) -> tuple[str, Path, str]:
    """(stable version, candidate dir, candidate version): the newest detector under another version id."""
    from meshserve.inference.artifacts import latest

    source = latest("detector", home)
    assert source is not None
    stable = json.loads((source / "card.json").read_text())["version"]
    target = out / "detector-candidate"
    shutil.copytree(source, target)
    card = json.loads((target / "card.json").read_text())
    card["version"] = f"{stable}-candidate"
    (target / "card.json").write_text(json.dumps(card))
    return stable, target, card["version"]


def gauge(metrics_port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and labels in line)  # fmt: skip


def run(home: Path, blocks: int, per_block: int, warmup: int, say: Callable[[str], None]) -> dict[str, Timings]:
    registry = f"127.0.0.1:{free_port()}"
    work = Path(tempfile.mkdtemp(prefix="meshserve-bench-rollout-"))
    procs = Processes({"MESHSERVE_HOME": str(home), "CONSUL_HTTP_ADDR": f"http://{registry}"}, work)
    channel: grpc.Channel | None = None
    try:
        procs.start("registry", "registry", "dev", "--http-addr", registry)
        wait(lambda: urllib.request.urlopen(f"http://{registry}/v1/status/leader", timeout=1).status == 200,
             "registry")  # fmt: skip
        stable, candidate_dir, candidate = candidate_copy(home, work)
        for name, extra in (("detector", []), ("detector-candidate", ["--model", str(candidate_dir)])):
            port = free_port()
            procs.start(name, "serve", "detector", "--port", str(port), "--threads", "1", "--check-interval", "0.5",
                        *extra)  # fmt: skip
            target = f"127.0.0.1:{port}"
            wait(lambda: serving(target), name)  # noqa: B023 - called before the loop goes on
        gateway, metrics_port = f"127.0.0.1:{free_port()}", free_port()
        procs.start("gateway", "gateway", "--addr", gateway, "--no-register", "--metrics-port", str(metrics_port))
        wait(lambda: gauge(metrics_port, "meshserve_gateway_replicas", 'stage="detector"') == 2, "gateway routes")
        import consul

        kv = consul.Consul(host=registry.split(":")[0], port=int(registry.split(":")[1])).kv
        kv.put("meshserve/config/listing-guard", json.dumps({"models": {"detector": {"timeout_ms": 5000}}}))
        docs = {side: json.dumps({"stable": stable, "candidate": {"version": candidate, "canary_percent": 10,
                                                                  "shadow_percent": shadow}})
                for side, shadow in (("canary", 0), ("policy", 50))}  # fmt: skip

        def in_force(side: str) -> None:
            if side in docs:
                kv.put(KEY, docs[side])
                index = int(kv.get(KEY)[1]["ModifyIndex"])
            else:
                kv.delete(KEY)
                index = 0
            wait(lambda: gauge(metrics_port, "meshserve_gateway_rollout_policy_modify_index",
                               'service="detector"') == index, f"{side} in force", timeout=30)  # fmt: skip

        photo = photo_of(home)
        channel = grpc.insecure_channel(gateway)
        guard = listing_guard_pb2_grpc.ListingGuardStub(channel)
        request = check_request("ceramic mug", photo, ["detector"])

        def call() -> bool:
            reply = guard.Check(request, timeout=10)
            if reply.verdicts[0].status != 1:
                raise RuntimeError(f"detector verdict {reply.verdicts[0]}")
            return True

        wait(call, "the detector answering through the gateway", timeout=60)
        for _ in range(warmup):
            call()
        say(f"two detector versions and the gateway up; {blocks} blocks of {per_block} checks per side, alternating")
        sides = ["none", "canary", "policy"]
        out = {side: Timings() for side in sides}
        for n in range(blocks):
            for side in sides if n % 2 == 0 else sides[::-1]:
                in_force(side)
                out[side].seconds += [timed(call) for _ in range(per_block)]
        shadows = gauge(metrics_port, "meshserve_gateway_shadow_requests_total", 'outcome="compared"')
        say(f"shadow calls compared during the run: {shadows:.0f}")
        return out
    finally:
        if channel is not None:
            channel.close()
        procs.close()


def report(out: dict[str, Timings]) -> str:
    lines = [f"{'side':<8} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}"]
    for name, t in out.items():
        mean = sum(t.seconds) / len(t.seconds)
        lines.append(f"{name:<8} {len(t.seconds):>6} {1000 * t.p50:8.2f} {1000 * t.p99:8.2f} {1000 * mean:8.2f}")
    lines.append("")
    for side, what in (("canary", "canary 10 %"), ("policy", "canary 10 % + shadow 50 %")):
        added = out[side].p50 - out["none"].p50
        goal = f"  (goal ≤ +1 ms: {'met' if added <= 0.001 else 'NOT met'})" if side == "canary" else ""
        lines.append(f"added by the policy, {what}: p50 {1000 * added:+.2f} ms, "
                     f"p99 {1000 * (out[side].p99 - out['none'].p99):+.2f} ms{goal}")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--home", type=Path, help="MESHSERVE_HOME with trained models (default: train tiny ones)")
    parser.add_argument("--blocks", type=int, default=6, help="blocks per side (default 6)")
    parser.add_argument("--per-block", type=int, default=100, help="timed checks per block (default 100)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed checks first (default 30)")
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.per_block < 2:
        parser.error("need --blocks ≥ 1 and --per-block ≥ 2")

    def say(line: str) -> None:
        print(line, flush=True)

    home = ensure_home(args.home, say)
    out = run(home, args.blocks, args.per_block, args.warmup, say)
    say("")
    say(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
