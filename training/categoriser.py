"""The detector's second stage: the category of a product crop, from a small CNN."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meshserve.training.catalogue import CATEGORY_NAMES, Item
from meshserve.training.embedder import EmbedNet, to_tensor
from meshserve.training.views import SpriteViews


class Categoriser(nn.Module):
    """EmbedNet features → category logits."""

    def __init__(self, n_classes: int = len(CATEGORY_NAMES), width: int = 12, dim: int = 64):
        super().__init__()
        self.features = EmbedNet(dim, width)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))

    @torch.inference_mode()
    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops [n, C, C, 3] → float32 [n, classes]."""
        if len(crops) == 0:
            return np.zeros((0, self.head.out_features), dtype=np.float32)
        return torch.softmax(self(to_tensor(crops)), dim=1).numpy()


def fit_categoriser(net: Categoriser, items: Sequence[Item], crop: int, epochs: int,
                    batch_size: int, lr: float, seed: int, bar=None) -> list[float]:  # type: ignore[no-untyped-def]
    """Train on torch-made views of every item; returns the loss per step."""
    torch.manual_seed(seed)
    views = SpriteViews(items, seed=seed + 1)
    labels = torch.tensor([it.category_index for it in items], dtype=torch.long)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = max(1, math.ceil(len(items) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps_per_epoch * epochs,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(seed + 2)
    losses: list[float] = []
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(items), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * batch_size:(s + 1) * batch_size]
            if len(idx) < 2:
                sched.step()
                continue
            with torch.no_grad():
                x = views.batch(idx, crop, gen, jitter=0.15)
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
    net.eval()
    return losses
