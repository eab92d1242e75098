"""Where each mesh process spends its CPU during photo search at 16 in flight: top frames per process.

Run:  nice -n 10 python bench/profile_mesh.py --home ~/.meshserve [--shards 4] [--seconds 20]

Starts the same local mesh as bench/gateway.py (model servers `--threads 1`), drives it with 16
searches in flight, and samples every process with py-spy (`pip install py-spy`, or the `bench`
extra) meanwhile: Python frames only (`--nonblocking`, so the sampled process never stops). For
each process it prints the share of its samples per thread, the frames that were running (self),
and the functions of this repository that were on the stack (inclusive). A frame inside gRPC's or
torch's C code is counted at the Python line that called it.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import gateway_bench  # bench/helpers/, beside this script

bg = gateway_bench.load()  # bench/gateway.py: the mesh's ports, roles and search load

OWN_CODE = ("meshserve/", "gateway/", "servers/", "registry/")
ENTRY_POINTS = ("cli.py", "child.py", "event_loop.py")  # under every sample: they say nothing


@dataclass(frozen=True)
class ProfileConfig:
    home: Path
    shards: int = 4
    indexer_processes: int = 1
    seconds: float = 20.0
    rate: int = 100  # samples per second per process
    top: int = 10
    min_score: float = 0.3


@dataclass
class Profile:
    samples: int
    threads: collections.Counter[str]
    running: collections.Counter[str]
    on_stack: collections.Counter[str]


def read_raw(path: Path) -> Profile:
    """py-spy's raw format: one line per distinct stack, frames root first, `;`-joined, then a count."""
    threads: collections.Counter[str] = collections.Counter()
    running: collections.Counter[str] = collections.Counter()
    on_stack: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        threads[frames[0].partition("): ")[2] if frames[0].startswith("thread (") else "-"] += count
        running[frames[-1]] += count
        for frame in set(frames):
            if any(part in frame for part in OWN_CODE) and not any(entry in frame for entry in ENTRY_POINTS):
                on_stack[frame] += count
    return Profile(samples, threads, running, on_stack)


def report(role: str, profile: Profile, top: int) -> list[str]:
    if not profile.samples:
        return [f"{role}: no samples"]

    def share(n: int) -> str:
        return f"{100 * n / profile.samples:5.1f}%"

    lines = [f"== {role}: {profile.samples} samples; by thread: "
             + ", ".join(f"{name} {share(n).strip()}" for name, n in profile.threads.most_common(4))]
    lines += ["  running (self):"] + [f"    {share(n)}  {frame}" for frame, n in profile.running.most_common(top)]
    lines += ["  this repository's functions on the stack (inclusive):"]
    lines += [f"    {share(n)}  {frame}" for frame, n in profile.on_stack.most_common(top)]
    return lines


def profile_mesh(cfg: ProfileConfig, py_spy: str) -> list[str]:
    from meshserve.local.demo import held_out_photos
    from meshserve.local.mesh import LocalMesh, MeshConfig

    photos = [p.jpeg for p in held_out_photos(cfg.home, 60)]
    port = bg.free_port
    mesh_cfg = MeshConfig(home=cfg.home, registry_addr=f"127.0.0.1:{port()}", gateway_addr=f"127.0.0.1:{port()}",
                          shards=cfg.shards, threads=1, indexer_processes=cfg.indexer_processes,
                          gateway_metrics_port=port())  # fmt: skip
    mesh = LocalMesh(mesh_cfg, say=lambda line: print(f"  mesh: {line}", flush=True))
    out_dir = Path(tempfile.mkdtemp(prefix="meshserve-profile-"))
    try:
        info = mesh.start()
        bg.mesh_throughput(info.gateway, photos, cfg.min_score)  # warm every process up
        children = [(c.spec.name, c.proc.pid) for c in mesh.supervisor.children if c.alive]
        recorders = [
            (name, out_dir / f"{name}.raw",
             subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(int(cfg.seconds)),
                               "--rate", str(cfg.rate), "--format", "raw", "--threads", "--nonblocking",
                               "--output", str(out_dir / f"{name}.raw")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for name, pid in children
        ]  # fmt: skip
        searches = 0
        done = threading.Event()
        threading.Timer(cfg.seconds + 1.0, done.set).start()
        while not done.is_set():
            bg.mesh_throughput(info.gateway, photos, cfg.min_score)
            searches += len(photos)
        for _, _, recorder in recorders:
            recorder.wait(60)
        lines = [f"photo search, S={cfg.shards}, 16 in flight, {searches} searches while sampling "
                 f"{cfg.seconds:g} s at {cfg.rate}/s per process"]  # fmt: skip
        for name, raw, _ in recorders:
            if raw.exists():
                lines += report(f"{bg.role_of(name)} ({name})", read_raw(raw), cfg.top)
        return lines
    finally:
        mesh.stop()
        shutil.rmtree(out_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="MESHSERVE_HOME with trained models")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--indexer-processes", type=int, default=1, help="as bench/gateway.py (0: one per shard)")
    parser.add_argument("--seconds", type=float, default=20.0, help="sampling time per process (default 20)")
    parser.add_argument("--top", type=int, default=10, help="frames listed per process and kind (default 10)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("profile_mesh: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    cfg = ProfileConfig(home=args.home, shards=args.shards, indexer_processes=args.indexer_processes,
                        seconds=args.seconds, top=args.top)  # fmt: skip
    started = time.monotonic()
    print("\n".join(profile_mesh(cfg, py_spy)))
    print(f"(took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
