"""The detector's second stage: the category of a product crop, from the shared crop network."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meshserve.errors import InvalidInput
from meshserve.training.catalogue import CATEGORY_NAMES, Item
from meshserve.training.datasets import CROP_PAD, PhotoSet
from meshserve.training.embedder import EmbedderConfig, EmbedNet, to_tensor, train_crop_net
from meshserve.training.render import crop


class Categoriser(nn.Module):
    """The crop network's features → category logits (its `category` attribute head)."""

    def __init__(self, n_classes: int = len(CATEGORY_NAMES), width: int = 16, dim: int = 128):
        super().__init__()
        self.features = EmbedNet(dim, width)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.inference_mode()
    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops [n, C, C, 3] → float32 [n, classes]."""
        if len(crops) == 0:
            return np.zeros((0, self.head.out_features), dtype=np.float32)
        return torch.softmax(self(to_tensor(crops)), dim=1).numpy()


def categoriser_from_crop_net(cfg: EmbedderConfig, items: Sequence[Item], *,
                              progress: bool = True) -> tuple[Categoriser, dict]:
    """Train (or reuse) the shared crop network and take its category head."""
    net, heads, metrics = train_crop_net(cfg, items, progress=progress)
    cat = Categoriser(len(CATEGORY_NAMES), cfg.width, cfg.dim)
    cat.features.load_state_dict(net.state_dict())
    cat.head.load_state_dict(heads["category"].state_dict())
    return cat.eval(), metrics


def finetune_on_photos(cat: Categoriser, photos: PhotoSet, crop_size: int, epochs: int,
                       lr: float, seed: int, batch_size: int = 64) -> list[float]:
    """A few passes over the detector's own training photos: real renders, jittered boxes."""
    if epochs <= 0:
        return []
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF1]))
    objects = [(i, b, int(label)) for i, (boxes, labels) in enumerate(
        zip(photos.boxes, photos.labels, strict=True)) for b, label in zip(boxes, labels,
                                                                              strict=True)]
    opt = torch.optim.AdamW(cat.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * math.ceil(len(objects) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.2)
    losses: list[float] = []
    cat.train()
    for _ in range(epochs):
        order = rng.permutation(len(objects))
        for s in range(0, len(order), batch_size):
            chosen = [objects[j] for j in order[s:s + batch_size]]
            crops, labels = [], []
            for i, box, label in chosen:
                w, h = box[2] - box[0], box[3] - box[1]
                moved = box + rng.uniform(-0.12, 0.12, 4) * np.array([w, h, w, h])
                try:
                    crops.append(crop(photos.images[i], moved, crop_size, CROP_PAD))
                except InvalidInput:  # jittered off the image: keep the true box
                    crops.append(crop(photos.images[i], box, crop_size, CROP_PAD))
                labels.append(label)
            loss = F.cross_entropy(cat(to_tensor(np.stack(crops))), torch.tensor(labels))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    cat.eval()
    return losses
