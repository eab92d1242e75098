"""Detector training: DetNet's heatmap, box and category targets, then the box refiner on DetNet's
proposals; both start from the crop network that the embedder training also makes."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from meshserve.inference.artifacts import ModelCard, write_card
from meshserve.inference.detector import (
    STRIDE,
    Detector,
    DetectorConfig,
    DetNet,
    decode_boxes,
    letterbox,
    max_outputs,
)
from meshserve.inference.refiner import BoxRefiner
from meshserve.inference.vocabulary import CATEGORY_NAMES
from meshserve.training.catalogue import Item
from meshserve.training.datasets import (
    EVAL_SEEDS,
    REFINE_SEEDS,
    TRAIN_SEEDS,
    PhotoRequest,
    PhotoSet,
    loss_ends,
    optimiser_step,
    progress_bar,
    rendered_meanwhile,
    resolve_items,
    torch_threads,
)
from meshserve.training.embedder import train_crop_net
from meshserve.training.evaluate import eval_request, evaluate_detector
from meshserve.training.refiner import RefinerSchedule, train_refiner, training_samples
from meshserve.wire.signatures import card_signature, detector_signature

EVAL_MIN_SCORE = 0.01


def _targets(boxes: np.ndarray, labels: np.ndarray, grid: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian centre heatmap [G, G], box and category targets [4, G, G] and [G, G], and their
    weights [G, G]: a cell near a product's centre learns that product's box and category."""
    heat = np.zeros((grid, grid), dtype=np.float32)
    tbox = np.zeros((4, grid, grid), dtype=np.float32)
    category = np.zeros((grid, grid), dtype=np.int64)
    weight = np.zeros((grid, grid), dtype=np.float32)
    owner_area = np.full((grid, grid), np.inf, dtype=np.float32)
    cs = (np.arange(grid, dtype=np.float32) + 0.5) * STRIDE
    for box, label in zip(boxes, labels, strict=True):
        x0, y0, x1, y1 = box
        bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        sx, sy = max(bw / 6, STRIDE * 0.5), max(bh / 6, STRIDE * 0.5)
        g = np.exp(-((cs[None, :] - cx) ** 2) / (2 * sx**2) - ((cs[:, None] - cy) ** 2)
                   / (2 * sy**2))
        ix, iy = min(int(cx // STRIDE), grid - 1), min(int(cy // STRIDE), grid - 1)
        g[iy, ix] = 1.0  # the peak sits exactly on the centre cell
        heat = np.maximum(heat, g)
        area = bw * bh
        mine = (g > 0.3) & (area < owner_area)  # overlapping cells belong to the smaller box
        owner_area[mine] = area
        tbox[:, mine] = np.asarray(box, dtype=np.float32)[:, None]
        category[mine] = label
        weight[mine] = g[mine]
    return heat, tbox, category, weight


def _focal(pred_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Penalty-reduced focal loss on Gaussian heatmaps (CenterNet), per object."""
    p = torch.sigmoid(pred_logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1.0).float()
    neg_w = (1 - target) ** 4
    pos_loss = -torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = -torch.log(1 - p) * p**2 * neg_w * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def prepare(photos: PhotoSet, cfg: DetectorConfig) -> dict[str, torch.Tensor]:
    """Letterboxed images and their targets as tensors, once per training run."""
    grid = cfg.input_size // STRIDE
    imgs, heats, tboxes, categories, weights = [], [], [], [], []
    for img, boxes, labels in zip(photos.images, photos.boxes, photos.labels, strict=True):
        small, scale = letterbox(img, cfg.input_size)
        h, t, c, w = _targets(boxes * scale, labels, grid)
        imgs.append(small)
        heats.append(h)
        tboxes.append(t)
        categories.append(c)
        weights.append(w)
    return {
        "images": torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(),
        "heat": torch.from_numpy(np.stack(heats)),
        "tbox": torch.from_numpy(np.stack(tboxes)),
        "category": torch.from_numpy(np.stack(categories)),
        "weight": torch.from_numpy(np.stack(weights)),
    }


def _flip(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    t = batch["tbox"].flip(3)
    t = torch.stack([size - t[:, 2], t[:, 1], size - t[:, 0], t[:, 3]], 1)
    return {"images": batch["images"].flip(3), "heat": batch["heat"].flip(2), "tbox": t,
            "category": batch["category"].flip(2), "weight": batch["weight"].flip(2)}


def train_detector(cfg: DetectorConfig, out_dir: Path | str, progress: bool = True, *,
                   items: Sequence[Item] | None = None, data_seed: int | None = None,
                   evaluate: bool = True) -> dict:
    """Train on the warehouse's items (or `items`), evaluate on held-out photos, write the
    weights and a card into out_dir; returns the card's metrics."""
    out_dir = Path(out_dir)
    items, data_seed = resolve_items(items, data_seed)
    t0 = time.perf_counter()
    # the embedder's evaluation reads the same photos from the cache
    card_photos = eval_request(items, cfg.eval_photos or None)
    metrics = fit_detector(cfg, out_dir, items, progress=progress,
                           render_ahead=[card_photos] if evaluate else [])
    training_time = time.perf_counter() - t0
    if evaluate:
        photos = card_photos.render("render eval photos" if progress else None)
        det = Detector.load(out_dir)
        # AP integrates over every score, so evaluation keeps low-scoring boxes too
        metrics.update(evaluate_detector(lambda ims: det.detect(ims, EVAL_MIN_SCORE), photos))
        metrics["eval_seeds_from"] = EVAL_SEEDS
    metrics["total_s"] = round(time.perf_counter() - t0, 2)
    signature = detector_signature(max_outputs(asdict(cfg)), cfg.score_threshold)
    write_card(out_dir, ModelCard(kind="detector", version=out_dir.name, data_seed=data_seed,
                                  metrics=metrics, signature=card_signature(signature),
                                  training_time_s=round(training_time, 2), config=asdict(cfg),
                                  name="detector",
                                  extra={"labels": list(CATEGORY_NAMES[:cfg.n_classes])}))
    return metrics


def fit_detector(cfg: DetectorConfig, out_dir: Path, items: Sequence[Item], *,
                 progress: bool = True, render_ahead: Sequence[PhotoRequest] = ()) -> dict:
    """Train (or reuse) the crop network while the photos that DetNet, the refiner and
    `render_ahead` need are rendered in its gaps, then DetNet and the refiner from it; save
    weights + config; returns loss/timings."""
    torch.set_num_threads(torch_threads(cfg.threads))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    ecfg = cfg.crop_net_config()
    training_photos = PhotoRequest(items, cfg.photos, TRAIN_SEEDS, p_two=cfg.p_two, seed=cfg.seed)
    refiner_photos = PhotoRequest(items, cfg.refine_photos, REFINE_SEEDS, p_two=cfg.p_two,
                                  seed=cfg.seed)
    ahead = [training_photos, *([refiner_photos] if cfg.refine_photos else []), *render_ahead]
    # Only the crop network's training leaves a core partly idle: rendering in the background
    # while DetNet or the refiner trains slowed them down by more than it saved.
    with rendered_meanwhile(ahead):
        crop_net, heads, crop_metrics = train_crop_net(ecfg, items, progress=progress)
    crop_net_s = time.perf_counter() - t0
    t_detnet = time.perf_counter()
    photos = training_photos.render("render detector photos" if progress else None)
    net, losses = _fit_detnet(DetNet.from_crop_net(crop_net, ecfg.width, cfg.n_classes), photos,
                              cfg, progress)
    detnet_s = time.perf_counter() - t_detnet
    t_refine = time.perf_counter()
    refiner = BoxRefiner.from_crop_net(crop_net, heads["category"], ecfg.width, ecfg.dim)
    detector = Detector(net, refiner, cfg)
    refine_losses, refine_samples = _fit_refiner(detector, photos, refiner_photos, cfg, progress)
    refine_s = time.perf_counter() - t_refine
    detector.save(Path(out_dir))
    loss_first, loss_last = loss_ends(losses)
    return {
        "train_photos": len(photos.images),
        "steps": len(losses),
        "loss_first": loss_first,
        "loss_last": loss_last,
        "train_s": round(time.perf_counter() - t0, 2),
        "crop_net_s": round(crop_net_s, 2),
        "crop_net_reused": bool(crop_metrics.get("reused_cached_training", False)),
        "detnet_s": round(detnet_s, 2),
        "images_per_s": round(len(losses) * cfg.batch_size / max(detnet_s, 1e-6), 1),
        "refine_s": round(refine_s, 2),
        "refine_samples": refine_samples,
        "refine_loss": [round(x, 4) for x in loss_ends(refine_losses)] if refine_losses else None,
    }


def _fit_detnet(net: DetNet, photos: PhotoSet, cfg: DetectorConfig, progress: bool
                ) -> tuple[DetNet, list[float]]:
    """Centre heatmap (focal loss), box (GIoU) and category (cross-entropy) training; half the
    batches mirrored."""
    data = prepare(photos, cfg)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=True)
    n = len(data["images"])
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = progress_bar(total, "train detector" if progress else None, unit="step")
    losses: list[float] = []
    net.train()
    for _epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            if len(idx) < 2:
                continue
            batch = {k: v[idx] for k, v in data.items()}
            if torch.rand(1, generator=gen).item() < 0.5:
                batch = _flip(batch, cfg.input_size)
            x = ((batch["images"].float() / 255.0 - 0.5) / 0.25).contiguous(
                memory_format=torch.channels_last)
            obj_out, box_out, category_out = net(x)
            loss_hm = _focal(obj_out[:, 0], batch["heat"])
            w = batch["weight"]
            sel = w > 0
            norm = w[sel].sum().clamp(min=1.0)
            pred = decode_boxes(box_out).permute(0, 2, 3, 1)[sel]
            tgt = batch["tbox"].permute(0, 2, 3, 1)[sel]
            loss_box = (generalized_box_iou_loss(pred, tgt, reduction="none") * w[sel]).sum() / norm
            loss_category = (F.cross_entropy(category_out.permute(0, 2, 3, 1)[sel],
                                             batch["category"][sel], reduction="none")
                             * w[sel]).sum() / norm
            loss = loss_hm + 2.0 * loss_box + cfg.detnet_category_loss * loss_category
            optimiser_step(loss, opt, sched, losses, bar)
    bar.close()
    return net, losses


def _fit_refiner(det: Detector, photos: PhotoSet, more_photos: PhotoRequest, cfg: DetectorConfig,
                 progress: bool) -> tuple[list[float], int]:
    """Train the refiner on DetNet's own proposals over its training photos and over
    `more_photos` that DetNet never saw (its proposals there are as loose as at serving)."""
    if more_photos.n_photos:
        more = more_photos.render("render refiner photos" if progress else None)
        photos = PhotoSet(np.concatenate([photos.images, more.images]),
                          photos.boxes + more.boxes, photos.labels + more.labels,
                          photos.item_ids + more.item_ids)
    proposals: list[np.ndarray] = []
    for i in range(0, len(photos.images), 64):
        # DetNet's one-view proposals, a little looser than the mirrored ones served: as good
        # (quick, same DetNet, two trainings each: AP@0.5 0.885 and 0.885, against 0.885 and
        # 0.883 with mirrored ones) and 2-3 s cheaper
        boxes, _, _ = det.propose(list(photos.images[i:i + 64]), cfg.score_threshold, mirrored=False)
        proposals += [b.numpy() for b in boxes]
    schedule = RefinerSchedule(epochs=cfg.refine_epochs, lr=cfg.refine_lr,
                               background_per_photo=cfg.refine_background, seed=cfg.seed)
    samples = training_samples(photos, proposals, cfg.n_classes, det.crop_size, schedule)
    losses = train_refiner(det.refiner, samples, schedule, progress=progress)
    return losses, len(samples.labels)
