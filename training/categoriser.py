"""The detector's second stage: the category of a product crop, from the shared crop network."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from meshserve.training.catalogue import CATEGORY_NAMES, Item
from meshserve.training.embedder import EmbedderConfig, EmbedNet, to_tensor, train_crop_net


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
