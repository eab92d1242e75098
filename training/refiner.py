"""Training the detector's box refiner on DetNet's own proposals over rendered photos.

DetNet proposes class-agnostic boxes from a small, coarse heatmap; the refiner looks at each
proposal again, at the crop network's resolution, the way the second stage of a two-stage
detector does (meshserve/inference/refiner.py). It starts from the crop network shared with the
embedder (its category head included) and learns on the boxes it will be given at serving time:
loose ones, off-centre ones, and ones on clutter that it must call background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from meshserve.errors import InvalidInput
from meshserve.inference.crops import crop
from meshserve.inference.embedder import to_tensor
from meshserve.inference.refiner import REFINE_PAD, BoxRefiner, box_shape, unmirror
from meshserve.training.datasets import PhotoSet, optimiser_step, progress_bar
from meshserve.training.evaluate import box_iou

MATCH_IOU = 0.5  # a proposal at least this close to a product learns its category and box
BACKGROUND_IOU = 0.3  # one below this with every product learns "background"


def box_deltas(boxes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """How far each side of the truth lies from the proposal's, in proposal widths/heights."""
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, 1)
    return ((truth - boxes) / np.maximum(size, 1e-6)).astype(np.float32)


@dataclass(frozen=True)
class RefinerSchedule:
    """How the refiner is trained on proposals."""

    epochs: int = 3
    lr: float = 2e-3
    weight_decay: float = 5e-4
    batch_size: int = 64
    background_per_photo: int = 2  # hardest first: DetNet's best-scoring misses
    truth_jitter: float = 0.15  # each product also appears as its true box, edges moved this much
    box_weight: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Samples:
    """Training crops for the refiner: uint8 [n, C, C, 3], their boxes' box_shape [n, 2],
    labels (n_classes = background), box targets [n, 4] and which rows have one."""

    crops: np.ndarray
    shapes: np.ndarray
    labels: np.ndarray
    targets: np.ndarray
    has_box: np.ndarray


def training_samples(photos: PhotoSet, proposals: Sequence[np.ndarray], n_classes: int,
                     crop_size: int, schedule: RefinerSchedule) -> Samples:
    """Label every proposal by its overlap with the products, keep a few background ones per
    photo, and add each product's jittered true box."""
    rng = np.random.default_rng(np.random.SeedSequence([schedule.seed, 0x2EF]))
    crops, boxes_seen, labels, targets, has_box = [], [], [], [], []

    def add(photo: Image.Image, box: np.ndarray, label: int, truth: np.ndarray | None) -> None:
        try:
            crops.append(crop(photo, box, crop_size, REFINE_PAD))
        except InvalidInput:  # moved off the image
            return
        boxes_seen.append(box)
        labels.append(label)
        has_box.append(truth is not None)
        targets.append(box_deltas(box[None], truth[None])[0] if truth is not None
                       else np.zeros(4, np.float32))

    for image, boxes, truth, truth_labels in zip(photos.images, proposals, photos.boxes,
                                                 photos.labels, strict=True):
        h, w = image.shape[:2]
        photo = Image.fromarray(image)  # once per photo, not per crop
        iou = box_iou(boxes, truth) if len(truth) else np.zeros((len(boxes), 0))
        best = iou.max(axis=1) if iou.shape[1] else np.zeros(len(boxes))
        background = 0
        for j, box in enumerate(boxes):  # proposals come best-scoring first
            if best[j] >= MATCH_IOU:
                g = int(iou[j].argmax())
                add(photo, box, int(truth_labels[g]), truth[g])
            elif best[j] < BACKGROUND_IOU and background < schedule.background_per_photo:
                add(photo, box, n_classes, None)
                background += 1
        for g, box in enumerate(truth):
            bw, bh = box[2] - box[0], box[3] - box[1]
            moved = box + rng.uniform(-1, 1, 4) * schedule.truth_jitter * np.array([bw, bh, bw, bh])
            moved = np.clip(moved, 0, [w, h, w, h]).astype(np.float32)
            if moved[2] - moved[0] >= 4 and moved[3] - moved[1] >= 4:
                add(photo, moved, int(truth_labels[g]), box)
    return Samples(np.stack(crops), box_shape(np.stack(boxes_seen)), np.asarray(labels, np.int64),
                   np.stack(targets), np.asarray(has_box, bool))


def train_refiner(refiner: BoxRefiner, samples: Samples, schedule: RefinerSchedule, *,
                  progress: bool = True) -> list[float]:
    """Cross-entropy over categories + background, smooth L1 on the box corrections of
    proposals that match a product; half of each batch is mirrored."""
    if schedule.epochs == 0:
        return []
    rng = np.random.default_rng(np.random.SeedSequence([schedule.seed, 0x2F1]))
    n = len(samples.labels)
    steps = schedule.epochs * math.ceil(n / schedule.batch_size)
    opt = torch.optim.AdamW(refiner.parameters(), lr=schedule.lr,
                            weight_decay=schedule.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=schedule.lr, total_steps=steps,
                                                pct_start=0.2)
    labels = torch.from_numpy(samples.labels)
    targets = torch.from_numpy(samples.targets)
    has_box = torch.from_numpy(samples.has_box)
    shapes = torch.from_numpy(samples.shapes)
    bar = progress_bar(steps, "train box refiner" if progress else None, unit="step")
    losses: list[float] = []
    refiner.train()
    for _ in range(schedule.epochs):
        order = rng.permutation(n)
        for s in range(0, n, schedule.batch_size):
            idx = order[s:s + schedule.batch_size]
            x, t = to_tensor(samples.crops[idx]), targets[idx]
            if rng.random() < 0.5:
                x, t = x.flip(3), unmirror(t)
            logits, deltas = refiner(x, shapes[idx])  # a mirrored box keeps its shape
            loss = F.cross_entropy(logits, labels[idx])
            boxed = has_box[idx]
            if boxed.any():
                loss = loss + schedule.box_weight * F.smooth_l1_loss(deltas[boxed], t[boxed],
                                                                     beta=0.05)
            optimiser_step(loss, opt, sched, losses, bar)
    bar.close()
    refiner.eval()
    return losses
