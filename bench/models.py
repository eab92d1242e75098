"""Detector and embedder latency per image vs torchvision's mobilenet_v3_small at 224 px.

Run:  python bench/models.py                         # newest artifacts, else untrained nets
      python bench/models.py --detector DIR --embedder DIR --threads 2

The yardstick (mobilenet_v3_small, weights=None, 224×224, eval mode) is measured in the
same run with the same thread count. Detector and embedder times are the whole in-process
inference path the servers run: decode-free, but letterbox/crop, network and box decoding.
Goal: detector ≤ 4× and embedder ≤ 1× the yardstick's batch-1 time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def per_image_ms(fn: Callable[[], object], batch: int, repeats: int, warmup: int = 3) -> float:
    """Median wall time of `fn` over `repeats` runs, divided by the batch size, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / batch * 1000


def load_models(detector_dir: str | None, embedder_dir: str | None):  # type: ignore[no-untyped-def]
    from meshserve.inference.artifacts import latest
    from meshserve.inference.detector import Detector, DetectorConfig
    from meshserve.inference.embedder import Embedder, EmbedderConfig, EmbedNet

    ddir = Path(detector_dir) if detector_dir else latest("detector")
    edir = Path(embedder_dir) if embedder_dir else latest("embedder")
    if ddir is not None:
        det = Detector.load(ddir)
    else:
        det = Detector.untrained(DetectorConfig())
    if edir is not None:
        emb = Embedder.load(edir)
    else:
        ecfg = EmbedderConfig()
        emb = Embedder(EmbedNet(ecfg.dim, ecfg.width), ecfg, version="untrained")
    return det, emb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", help="detector artifact dir (default: newest)")
    parser.add_argument("--embedder", help="embedder artifact dir (default: newest)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for all models")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--photo-size", type=int, default=160, help="side of the test photos")
    args = parser.parse_args()

    import torchvision

    from meshserve.training.catalogue import generate_items
    from meshserve.training.render import RenderConfig, render_photo

    torch.set_num_threads(args.threads)
    det, emb = load_models(args.detector, args.embedder)
    items = generate_items(16)
    photos = [render_photo(it, 7, RenderConfig(size=args.photo_size)) for it in items]
    images = [p.image for p in photos]
    boxes = [p.boxes for p in photos]

    yard = torchvision.models.mobilenet_v3_small(weights=None).eval()
    x1 = torch.randn(1, 3, 224, 224)
    x16 = torch.randn(16, 3, 224, 224)

    def yardstick(x: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return yard(x)
        return run

    rows = []
    r = args.repeats
    yard1 = per_image_ms(yardstick(x1), 1, r)
    yard16 = per_image_ms(yardstick(x16), 16, max(3, r // 4))
    rows.append(("mobilenet_v3_small 224px (yardstick)", yard1, yard16))
    d1 = per_image_ms(lambda: det.detect(images[:1]), 1, r)
    d16 = per_image_ms(lambda: det.detect(images), 16, max(3, r // 4))
    rows.append((f"detector {det.cfg.input_size}px w{det.cfg.crop_net_config().width} "
                 f"({det.version})", d1, d16))
    e1 = per_image_ms(lambda: emb.embed(images[:1], boxes[:1]), 1, r)
    e16 = per_image_ms(lambda: emb.embed(images, boxes), 16, max(3, r // 4))
    rows.append((f"embedder {emb.cfg.crop_size}px d{emb.dim} ({emb.version})", e1, e16))

    print(f"threads={args.threads}  photos {args.photo_size}px  (per image, median, ms)")
    print(f"{'model':<48s} {'batch 1':>9s} {'batch 16':>9s} {'b1 / yardstick b1':>18s}")
    for name, b1, b16 in rows:
        print(f"{name:<48s} {b1:9.3f} {b16:9.3f} {b1 / yard1:17.2f}x")
    print(f"goal: detector <= 4x ({'met' if d1 <= 4 * yard1 else 'NOT met'}), "
          f"embedder <= 1x ({'met' if e1 <= yard1 else 'NOT met'}) of the yardstick's batch 1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
