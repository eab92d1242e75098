"""The product embedder at inference: its config, the crop network, and crops → unit vectors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from meshserve.errors import InvalidInput
from meshserve.inference.crops import CROP_PAD, crop

WEIGHTS_FILE = "embedder.pt"
CONFIG_FILE = "embedder.json"


@dataclass(frozen=True)
class EmbedderConfig:
    """Embedder size and training schedule; `quick()` fits the 3-minute pipeline."""

    crop_size: int = 48
    dim: int = 128
    width: int = 16
    epochs: int = 56  # passes over the items, a fresh random view of each per pass
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    proxy_scale: float = 24.0
    aux_weight: float = 1.0  # shared by the attribute heads
    category_weight: float = 1.0  # the category head alone: the detector's refiner starts from it
    jitter: float = 0.1  # crop edges move by up to this share of the box, like a detector's
    eval_photos: int = 0  # held-out photos the card's recall is measured on; 0: one per item
    seed: int = 0
    threads: int = 0  # 0: as many as the process has (see datasets.torch_threads)

    @classmethod
    def quick(cls) -> EmbedderConfig:
        # The quick detector's refiner gets few epochs, so it leans on the category head it
        # starts from. Weight 2 makes that head better at some cost to retrieval, and two more
        # epochs win most of it back (same 1,000 held-out photos, quick detector with 4 refiner
        # epochs: AP@0.5 0.882 at weight 1, 0.897 at 2; recall@10 0.921, 0.911; at weight 2,
        # 24 epochs and 5 refiner epochs: AP@0.5 0.907, recall@10 0.916). Its card is measured
        # on the quick detector's card photos, which are rendered by then.
        return cls(epochs=24, category_weight=2.0, eval_photos=1000)

    @classmethod
    def tiny(cls) -> EmbedderConfig:
        """For tests: seconds, not minutes."""
        return cls(width=8, dim=64, epochs=3, batch_size=32)

    def __post_init__(self) -> None:
        if self.dim < 16 or self.crop_size < 16 or self.epochs < 1:
            raise InvalidInput("embedder config: dim, crop_size >= 16; epochs >= 1")


def stage_channels(width: int) -> tuple[int, int, int, int]:
    """Channels of the crop network's four conv stages (strides 2, 4, 8 and 16)."""
    return width, 2 * width, 4 * width, 6 * width


def conv_stages(width: int) -> nn.Sequential:
    """The crop network's convolutions: per stage a strided conv and a plain one, eight layers;
    the stride-8 stage ends at layer 6 (see detector.DetNet, which starts from them)."""
    layers: list[nn.Module] = []
    prev = 3
    for c in stage_channels(width):
        layers += [Conv2dNormActivation(prev, c, 3, stride=2), Conv2dNormActivation(c, c, 3)]
        prev = c
    return nn.Sequential(*layers)


def pooled_dim(width: int) -> int:
    """Length of EmbedNet.pool's output: average and max of the last stage's channels."""
    return 2 * stage_channels(width)[-1]


def pool_map(f: torch.Tensor) -> torch.Tensor:
    """The last stage's map [n, c, h, w] → its average and max per channel [n, 2c]."""
    return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)


class EmbedNet(nn.Module):
    """Four strided conv stages, average + max pooling, a linear projection to `dim`."""

    def __init__(self, dim: int = 128, width: int = 32):
        super().__init__()
        self.features = conv_stages(width)
        self.project = nn.Linear(pooled_dim(width), dim)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return pool_map(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(x))


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] → normalised float [n, 3, H, W] in channels_last."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
    x = (x / 255.0 - 0.5) / 0.25
    return x.contiguous(memory_format=torch.channels_last)


class Embedder:
    """In-process inference: the exact computation the embedder server runs."""

    def __init__(self, net: EmbedNet, cfg: EmbedderConfig, version: str = ""):
        self.net = net.eval().to(memory_format=torch.channels_last)
        self.cfg = cfg
        self.version = version

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @classmethod
    def load(cls, model_dir: Path | str) -> Embedder:
        model_dir = Path(model_dir)
        cfg = EmbedderConfig(**json.loads((model_dir / CONFIG_FILE).read_text()))
        net = EmbedNet(cfg.dim, cfg.width)
        net.load_state_dict(torch.load(model_dir / WEIGHTS_FILE, map_location="cpu",
                                       weights_only=True))
        return cls(net, cfg, version=model_dir.name)

    def save(self, model_dir: Path) -> None:
        model_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), model_dir / WEIGHTS_FILE)
        (model_dir / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2))

    @torch.inference_mode()
    def embed_crops(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 [n, C, C, 3] crops (already at crop_size) → float32 [n, dim], unit length."""
        out = []
        for i in range(0, len(crops), batch_size):
            v = self.net(to_tensor(crops[i:i + batch_size]))
            out.append(F.normalize(v, dim=1).numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def crops_for(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> np.ndarray:
        if len(images) != len(boxes):
            raise InvalidInput(f"{len(images)} images but {len(boxes)} box lists")
        s = self.cfg.crop_size
        crops: list[np.ndarray] = []
        for img, bs in zip(images, boxes, strict=True):
            photo = Image.fromarray(img)  # once per photo, not per box
            crops += [crop(photo, b, s, CROP_PAD) for b in np.asarray(bs, dtype=np.float32).reshape(-1, 4)]
        if not crops:
            return np.zeros((0, s, s, 3), dtype=np.uint8)
        return np.stack(crops)

    def embed(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> np.ndarray:
        """One unit vector per box; boxes[i] (float [k, 4] x0 y0 x1 y1, pixels) of images[i]."""
        return self.embed_crops(self.crops_for(images, boxes))
