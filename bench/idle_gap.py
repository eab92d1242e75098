"""What a process pays for having been idle: each search stage computed back to back vs after a pause.

Run:  nice -n 10 python bench/idle_gap.py --home ~/.meshserve [--gap-ms 15]

At concurrency 1 a mesh process waits while the other stages of a search run elsewhere, then
computes its own stage (the models of a listing check wait like this too); the in-process
pipeline computes every stage back to back in one hot process. This bench times the same
computations in one process both ways, interleaved photo by photo: "hot" (each call right after
the previous one) and "after a gap" (the thread sleeps --gap-ms before each call, about the time
a detector waits for the rest of a search). On a shared VM the caches, TLBs and branch predictors
are cold after the gap, so the same code runs slower. The mesh's latency ratio includes that
difference, although the mesh adds no work to it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def stages(home: Path) -> tuple[list[bytes], dict[str, Callable[[bytes], object]]]:
    from meshserve.inference.artifacts import latest
    from meshserve.inference.classifiers import ViolationClassifier, resolve_classifier_dir
    from meshserve.inference.detector import Detector
    from meshserve.inference.embedder import Embedder
    from meshserve.local.demo import held_out_photos
    from meshserve.servers.detector import detect_in_process
    from meshserve.servers.embedder import embed_in_process

    detector_dir, embedder_dir = latest("detector", home), latest("embedder", home)
    assert detector_dir is not None and embedder_dir is not None, f"no trained models under {home}"
    detector, embedder = Detector.load(detector_dir), Embedder.load(embedder_dir)
    photos = [p.jpeg for p in held_out_photos(home, 60)]
    classifier = ViolationClassifier(resolve_classifier_dir("counterfeit", home))
    box = np.array([[16, 16, 112, 112]], np.float32)
    price = np.array([12.5], np.float32)
    return photos, {
        "detect (decode + detector)": lambda photo: detect_in_process(detector, photo, 0.3),
        "embed (decode + 1 box)": lambda photo: embed_in_process(embedder, photo, box),
        "classify (1 listing)": lambda photo: classifier.score([b"blue mug"], [b"ceramic, 350 ml"], price, [b"mug"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="MESHSERVE_HOME with trained models")
    parser.add_argument("--gap-ms", type=float, default=15.0, help="idle time before each call (default 15)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the 60 photos (default 3)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as every model server runs (--threads 1)
    photos, calls = stages(args.home)
    gap = args.gap_ms / 1000.0
    seconds: dict[tuple[str, str], list[float]] = {}
    for name, call in calls.items():
        call(photos[0])  # warm-up
        for n in range(args.rounds * len(photos)):
            photo = photos[n % len(photos)]
            for mode in ("hot", "after a gap") if n % 2 == 0 else ("after a gap", "hot"):
                if mode == "hot":
                    call(photo)  # the previous call comes right before the timed one
                else:
                    time.sleep(gap)
                started = time.perf_counter()
                call(photo)
                seconds.setdefault((name, mode), []).append(time.perf_counter() - started)
    print(f"one process, torch on 1 thread, {len(photos)} held-out photos × {args.rounds}, p50 ms "
          f"(\"after a gap\": the thread slept {args.gap_ms:g} ms before the call)")
    print(f"{'stage':30s}{'hot':>8s}{'after a gap':>13s}{'added':>8s}")
    for name in calls:
        hot = 1000 * statistics.median(seconds[(name, "hot")])
        cold = 1000 * statistics.median(seconds[(name, "after a gap")])
        print(f"{name:30s}{hot:8.2f}{cold:13.2f}{cold - hot:+8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
