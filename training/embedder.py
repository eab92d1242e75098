"""Product embedder: crop → L2-normalised vector, trained with a normalised-softmax proxy loss."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
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
from meshserve.training.artifacts import ModelCard, meshserve_home, write_card
from meshserve.training.catalogue import (
    ACCENT_COLORS,
    CATEGORY_NAMES,
    DETAIL_COLORS,
    LOGOS,
    PALETTE,
    PATTERNS,
    Item,
)
from meshserve.training.datasets import (
    CROP_PAD,
    EVAL_SEEDS,
    loss_ends,
    optimiser_step,
    progress_bar,
    resolve_items,
    torch_threads,
)
from meshserve.training.evaluate import eval_photos, evaluate_retrieval
from meshserve.training.render import crop
from meshserve.training.views import SpriteViews

WEIGHTS_FILE = "embedder.pt"
CONFIG_FILE = "embedder.json"
# Part of the crop-network cache key: raised whenever its training or heads change, so that a
# cached network from older code is trained again instead of reused. 2: category head on the
# pooled features.
CROP_NET_FORMAT = 2

# Auxiliary heads: each predicts one attribute of the look from the embedding. They teach the
# net what a product is made of (shared by many items) faster than item ids alone can. The
# category head reads the pooled features before the projection instead, so the item-retrieval
# loss that shapes the embedding does not pull against it; the box refiner starts from it (quick,
# same held-out photos: the refiner's category accuracy on true boxes after 2 epochs 0.920 ->
# 0.941, the card's recall@10 0.916 -> 0.926).
ATTRIBUTES: dict[str, Sequence[str]] = {
    "category": CATEGORY_NAMES,
    "body_color": tuple(PALETTE),
    "accent_color": ACCENT_COLORS,
    "pattern": PATTERNS,
    "pattern_color": DETAIL_COLORS,
    "pattern_scale": ("0", "1", "2"),
    "logo": LOGOS,
    "logo_color": DETAIL_COLORS,
    "n_parts": ("0", "1", "2", "3"),
    "part_color": DETAIL_COLORS,
}


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


def _attribute_targets(items: Sequence[Item]) -> dict[str, torch.Tensor]:
    out = {}
    for name, values in ATTRIBUTES.items():
        idx = [list(values).index(str(getattr(it.look, name, it.category))) for it in items]
        out[name] = torch.tensor(idx, dtype=torch.long)
    return out


class ItemProxies(nn.Module):
    """One proxy per item: the sum of its look's attribute embeddings plus a free residual.

    Sharing attribute embeddings across items lets every view teach all items that share a
    colour or a pattern, which a free 2,000-way proxy table learns only after many epochs.
    """

    def __init__(self, attrs: dict[str, torch.Tensor], dim: int):
        super().__init__()
        self.attrs = attrs
        n = len(next(iter(attrs.values())))
        self.tables = nn.ModuleDict({k: nn.Embedding(len(ATTRIBUTES[k]), dim) for k in attrs})
        self.residual = nn.Parameter(torch.zeros(n, dim))

    def forward(self) -> torch.Tensor:
        out = self.residual
        for k, table in self.tables.items():
            out = out + table(self.attrs[k])
        return out


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


def signature(dim: int) -> dict:
    return {
        "inputs": {
            "image": {"dtype": "BYTES", "shape": [1], "doc": "an encoded JPEG/PNG photo"},
            "boxes": {"dtype": "FP32", "shape": [-1, 4], "doc": "x0, y0, x1, y1 in pixels"},
        },
        "outputs": {"embeddings": {"dtype": "FP32", "shape": [-1, dim],
                                   "doc": "one unit vector per box; inner product = cosine"}},
        "metric": "ip",
        "dim": dim,
    }


def train_embedder(cfg: EmbedderConfig, out_dir: Path | str, progress: bool = True, *,
                   items: Sequence[Item] | None = None, data_seed: int | None = None,
                   evaluate: bool = True) -> dict:
    """Train on the warehouse's items (or `items`), evaluate same-item retrieval on held-out
    photos against the colour-histogram baseline, write weights and a card into out_dir."""
    out_dir = Path(out_dir)
    items, data_seed = resolve_items(items, data_seed)
    t0 = time.perf_counter()
    metrics = fit_embedder(cfg, out_dir, items, progress=progress)
    training_time = time.perf_counter() - t0
    if metrics.get("reused_cached_training"):  # the detector stage trained the crop net
        training_time = float(metrics["prepare_s"]) + float(metrics["train_s"])
    if evaluate:
        photos = eval_photos(items, cfg.eval_photos or None, progress=progress)
        model = Embedder.load(out_dir)
        metrics.update(evaluate_retrieval(model.embed_crops, items, photos, cfg.crop_size,
                                          progress=progress))
        metrics["eval_seeds_from"] = EVAL_SEEDS
    metrics["total_s"] = round(time.perf_counter() - t0, 2)
    write_card(out_dir, ModelCard(kind="embedder", version=out_dir.name, data_seed=data_seed,
                                  metrics=metrics, signature=signature(cfg.dim),
                                  training_time_s=round(training_time, 2), config=asdict(cfg),
                                  name="embedder"))
    return metrics


def fit_embedder(cfg: EmbedderConfig, out_dir: Path, items: Sequence[Item], *,
                 progress: bool = True) -> dict:
    """Train (or reuse) the crop network for `items`, save the embedder, return its metrics."""
    net, _heads, metrics = train_crop_net(cfg, items, progress=progress)
    Embedder(net, cfg).save(Path(out_dir))
    return metrics


def attribute_heads(cfg: EmbedderConfig) -> nn.ModuleDict:
    """One linear head per attribute: the category's on EmbedNet.pool, the others on the
    embedding (see ATTRIBUTES)."""
    return nn.ModuleDict({k: nn.Linear(pooled_dim(cfg.width) if k == "category" else cfg.dim,
                                       len(v)) for k, v in ATTRIBUTES.items()})


def train_crop_net(cfg: EmbedderConfig, items: Sequence[Item], *, progress: bool = True
                   ) -> tuple[EmbedNet, nn.ModuleDict, dict]:
    """The crop network and its attribute heads, trained once per (items, cfg) and cached.

    The embedder is this network; the detector's box refiner starts from this network and its
    category head. Training it once serves both.
    """
    training = {k: v for k, v in asdict(cfg).items() if k != "eval_photos"}  # not training
    key = hashlib.sha256(repr((CROP_NET_FORMAT, training,
                               [(i.item_id, i.look) for i in items])).encode())
    path = meshserve_home() / "cache" / "cropnet" / f"{key.hexdigest()[:24]}.pt"
    net = EmbedNet(cfg.dim, cfg.width)
    heads = attribute_heads(cfg)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["net"])
        heads.load_state_dict(saved["heads"])
        return net, heads, {**json.loads(saved["metrics"]), "reused_cached_training": True}
    metrics = _train(cfg, items, net, heads, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"net": net.state_dict(), "heads": heads.state_dict(),
                "metrics": json.dumps(metrics)}, tmp)
    os.replace(tmp, path)
    return net, heads, metrics


def _train(cfg: EmbedderConfig, items: Sequence[Item], net: EmbedNet, heads: nn.ModuleDict,
           progress: bool) -> dict:
    torch.set_num_threads(torch_threads(cfg.threads))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    views = SpriteViews(items, seed=cfg.seed)
    prep_s = time.perf_counter() - t0
    attrs = _attribute_targets(items)

    net.to(memory_format=torch.channels_last)
    proxies = ItemProxies(attrs, cfg.dim)
    params = [*net.parameters(), *proxies.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    n = len(items)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                pct_start=0.15)
    bar = progress_bar(total, "train embedder" if progress else None, unit="step")
    losses: list[float] = []
    net.train()
    for idx, x in _view_batches(views, n, cfg, steps_per_epoch):
        pooled = net.pool(x)
        emb = net.project(pooled)
        cos = F.normalize(emb, dim=1) @ F.normalize(proxies(), dim=1).t()
        loss = F.cross_entropy(cos * cfg.proxy_scale, idx)
        for k, head in heads.items():
            reads, weight = ((pooled, cfg.category_weight) if k == "category"
                             else (emb, cfg.aux_weight / len(heads)))
            loss = loss + weight * F.cross_entropy(head(reads), attrs[k][idx])
        optimiser_step(loss, opt, sched, losses, bar)
    bar.close()
    net.eval()
    train_s = time.perf_counter() - t0 - prep_s
    loss_first, loss_last = loss_ends(losses)
    return {
        "train_items": n,
        "steps": total,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "prepare_s": round(prep_s, 2),
        "train_s": round(train_s, 2),
        "samples_per_s": round(total * cfg.batch_size / max(train_s, 1e-6), 1),
    }


class _ViewStream(torch.utils.data.IterableDataset):
    """The training views in order: a fresh permutation of the items per epoch."""

    def __init__(self, views: SpriteViews, n: int, cfg: EmbedderConfig, steps_per_epoch: int):
        self.views, self.n, self.cfg, self.steps = views, n, cfg, steps_per_epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        for _epoch in range(cfg.epochs):
            order = torch.randperm(self.n, generator=gen)
            for s in range(self.steps):
                idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                with torch.no_grad():
                    x = self.views.batch(idx, cfg.crop_size, gen, jitter=cfg.jitter)
                yield idx, x


def _view_batches(views: SpriteViews, n: int, cfg: EmbedderConfig, steps_per_epoch: int):  # type: ignore[no-untyped-def]
    """Views made in a worker process while the net trains (same sequence as in-process)."""
    stream = _ViewStream(views, n, cfg, steps_per_epoch)
    if cfg.epochs * steps_per_epoch < 50:  # a worker costs more than it saves on tiny runs
        yield from stream
        return
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1,
                                         prefetch_factor=4, multiprocessing_context="fork",
                                         worker_init_fn=_one_thread)
    # The worker keeps a core busy making views: the net trains on the others (on 2 cores,
    # 20 quick epochs took 62 s this way and 87 s with both threads fighting the worker).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield from loader
    finally:
        torch.set_num_threads(threads)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)
