"""Product detector: centre-heatmap box proposals from a small CNN, then a box refiner that names
each proposal's category (or background) and tightens its box. Both stages start from the crop
network that the embedder training also makes."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, nms
from torchvision.ops.misc import Conv2dNormActivation as ConvBN

from meshserve.errors import InvalidInput
from meshserve.training.artifacts import ModelCard, write_card
from meshserve.training.catalogue import CATEGORY_NAMES, Item
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
from meshserve.training.embedder import EmbedderConfig, EmbedNet, conv_stages, stage_channels, train_crop_net
from meshserve.training.evaluate import eval_request, evaluate_detector
from meshserve.training.refiner import BoxRefiner, RefinerSchedule, train_refiner, training_samples

WEIGHTS_FILE = "detector.pt"
CONFIG_FILE = "detector.json"
# Written beside the config; raised whenever the saved weights change shape, so that an artifact
# of an older layout is refused with a message instead of a state-dict error. 1: DetNet with its
# own backbone (no number saved); 2: DetNet on the crop network's conv stages, with a category
# head; 3: the refiner's category head reads the pooled features and the box's shape, its box
# corrections the last stage's map.
WEIGHTS_LAYOUT = 3
STRIDE = 8
EVAL_MIN_SCORE = 0.01
PAD_VALUE = 114


@dataclass(frozen=True)
class DetectorConfig:
    """Detector size and training schedule; `quick()` fits the 3-minute pipeline."""

    input_size: int = 128  # DetNet's backbone is the crop network's, so is its width
    photos: int = 3000  # rendered training photos (cached under MESHSERVE_HOME)
    epochs: int = 12
    batch_size: int = 32
    lr: float = 4e-3
    weight_decay: float = 1e-4
    p_two: float = 0.3
    score_threshold: float = 0.05
    max_detections: int = 8
    nms_iou: float = 0.5
    # second stage: the box refiner starts from the crop network shared with the embedder
    crop_net: str = "full"  # which EmbedderConfig preset trains it: full, quick or tiny
    refine_epochs: int = 5  # then learns on DetNet's proposals over the training photos
    refine_photos: int = 9000  # and over this many more photos DetNet never trained on
    refine_lr: float = 2e-3
    refine_background: int = 2  # background crops per photo the refiner learns from
    # at inference DetNet also looks at the mirrored photo, and the two maps are averaged (quick,
    # one model, 1,000 held-out photos: AP@0.5 0.879 -> 0.887, class-agnostic 0.937 -> 0.945;
    # full, 2,000: 0.975 -> 0.976)
    mirrored_detnet: bool = True
    # and the refiner looks again at a doubtful proposal moved by this share of its size
    view_shift: float = 0.08
    # mirrored and moved views only for a proposal DetNet is at least this sure of: three in four
    # are below 0.1 (quick, same model, 2,000 photos: no moved views for those took evaluation
    # from 28 s to 21 s at AP@0.5 0.8130 -> 0.8127; they are not mirrored either)
    look_closer_objectness: float = 0.1
    # and a box is reported once per category whose probability is at least label_ratio of the
    # best one's, up to labels_per_box, the way torchvision's detectors report every class
    # above their score threshold (AP@0.5 of the full model on its 2,000 held-out photos: 0.929
    # with neither, 0.953 with both at 3 and 0.1; quick, one model, 1,000 photos: 0.866 at
    # 3 and 0.1, 0.876 at 8 and 0.02, 0.876 with every category)
    labels_per_box: int = 8
    label_ratio: float = 0.02
    # DetNet also names the category at each proposal's centre; its answer is mixed into the
    # refiner's at this weight (quick, same model and photos: AP@0.5 0.805 with the refiner's
    # alone, 0.825 at 0.25, 0.822 at 0.5) and its loss counts this much beside the heatmap's
    detnet_category_weight: float = 0.25
    detnet_category_loss: float = 1.0
    eval_photos: int = 0  # held-out photos the card's AP is measured on; 0: one per item
    seed: int = 0
    threads: int = 0  # 0: as many as the process has (see datasets.torch_threads)
    n_classes: int = len(CATEGORY_NAMES)

    @classmethod
    def quick(cls) -> DetectorConfig:
        return cls(input_size=96, photos=2000, epochs=5, crop_net="quick",
                   refine_epochs=5, refine_photos=0, refine_background=1, eval_photos=1000)

    @classmethod
    def tiny(cls) -> DetectorConfig:
        """For tests: seconds, not minutes."""
        return cls(input_size=64, photos=96, epochs=8, batch_size=16, lr=1e-2,
                   crop_net="tiny", refine_epochs=2, refine_photos=32)

    def crop_net_config(self) -> EmbedderConfig:
        presets = {"full": EmbedderConfig, "quick": EmbedderConfig.quick,
                   "tiny": EmbedderConfig.tiny}
        if self.crop_net not in presets:
            raise InvalidInput(f"crop_net must be one of {sorted(presets)}, got {self.crop_net!r}")
        return presets[self.crop_net]()

    def __post_init__(self) -> None:
        if self.input_size % (2 * STRIDE) or self.input_size < 32:
            raise InvalidInput(f"input_size must be a multiple of {2 * STRIDE} and >= 32")
        if self.photos < 1 or self.epochs < 1:
            raise InvalidInput("detector config: photos, epochs >= 1")
        if self.refine_photos < 0 or self.refine_epochs < 0 or self.refine_background < 0:
            raise InvalidInput("detector config: refine_photos, refine_epochs, refine_background >= 0")
        if not 0 <= self.detnet_category_weight <= 1 or self.detnet_category_loss < 0:
            raise InvalidInput("detector config: detnet_category_weight in [0, 1], "
                               "detnet_category_loss >= 0")
        if not 0 <= self.view_shift < 0.5 or self.labels_per_box < 1 or not 0 <= self.label_ratio <= 1:
            raise InvalidInput("detector config: view_shift in [0, 0.5), labels_per_box >= 1, "
                               "label_ratio in [0, 1]")


class DetNet(nn.Module):
    """The crop network's conv stages (to stride 8 and 16), a top-down merge to stride 8, an
    objectness, a box and a category head.

    It starts from the trained crop network (`from_crop_net`), the way detectors start from a
    trained classification backbone: that network has learnt what products look like, at about
    the size they have in DetNet's input, so DetNet only has to learn where they are (quick
    crop network, 6 epochs, 2,000 held-out photos: AP@0.5 0.730 from random weights, 0.811
    from the crop network's).
    """

    def __init__(self, crop_width: int, n_classes: int):
        super().__init__()
        stages = conv_stages(crop_width)
        self.s8, self.s16 = stages[:6], stages[6:]
        _, _, c8, c16 = stage_channels(crop_width)
        self.lateral = ConvBN(c8, c16, 1)
        self.fuse = ConvBN(c16, c16, 3)
        self.obj = nn.Conv2d(c16, 1, 1)
        self.box = nn.Conv2d(c16, 4, 1)
        self.category = nn.Conv2d(c16, n_classes, 1)
        assert self.obj.bias is not None and self.box.bias is not None  # Conv2d's default
        nn.init.constant_(self.obj.bias, -2.19)  # start near p = 0.1: the heatmap is mostly empty
        nn.init.zeros_(self.box.bias)

    @classmethod
    def from_crop_net(cls, crop_net: EmbedNet, crop_width: int, n_classes: int) -> DetNet:
        net = cls(crop_width, n_classes)
        for layer, trained in zip([*net.s8, *net.s16], crop_net.features, strict=True):
            layer.load_state_dict(trained.state_dict())
        return net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Objectness logits [n, 1, G, G], box log-distances [n, 4, G, G], category logits
        [n, classes, G, G]."""
        f8 = self.s8(x)
        f16 = self.s16(f8)
        p = self.fuse(self.lateral(f8) + F.interpolate(f16, scale_factor=2.0, mode="nearest"))
        return self.obj(p), self.box(p), self.category(p)


def outdated(model_dir: Path | str) -> str | None:
    """Why this code cannot load a detector artifact written by an older meshserve, or None."""
    return _outdated(json.loads((Path(model_dir) / CONFIG_FILE).read_text()))


def _outdated(saved: dict) -> str | None:
    if "refine_epochs" not in saved:
        return "it predates the box refiner"
    layout = saved.get("weights_layout", 1)
    if layout == 1:
        return "its DetNet predates the crop-network backbone"
    if layout == 2:
        return "its box refiner has the older heads"
    if layout != WEIGHTS_LAYOUT:
        return f"its weights layout {layout} is unknown to this meshserve"
    return None


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Scale the longer side to `size`, pad right/bottom with grey; returns (pixels, scale)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    out[:nh, :nw] = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    return out, scale


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return ((x / 255.0 - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)


def _cell_centres(grid: int) -> torch.Tensor:
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) * STRIDE
    return torch.stack(torch.meshgrid(c, c, indexing="xy"), 0)  # [2 (x, y), G, G]


def decode_boxes(box_out: torch.Tensor) -> torch.Tensor:
    """Head output [n, 4, G, G] (log distances to the box sides) → boxes [n, 4, G, G]."""
    centres = _cell_centres(box_out.shape[-1])
    dist = torch.exp(box_out.clamp(-6, 6)) * (2 * STRIDE)
    return torch.cat([centres - dist[:, :2], centres + dist[:, 2:]], 1)


class Detector:
    """In-process inference: the exact computation the detector server runs.

    Two stages: DetNet proposes class-agnostic boxes (objectness peaks of its maps of the photo
    and of its mirror image, averaged) and guesses each one's category from its centre cell;
    the refiner names each proposal's category (or background) from its crop and the box's
    shape and tightens the box, and the two guesses are mixed (_category_probs). A box whose
    category is in doubt is reported under each likely category, scored √objectness × category
    probability (see _labelled), then non-maximum suppression runs per category.
    """

    def __init__(self, net: DetNet, refiner: BoxRefiner, cfg: DetectorConfig, version: str = ""):
        self.net = net.eval().to(memory_format=torch.channels_last)
        self.refiner = refiner.eval().to(memory_format=torch.channels_last)
        self.cfg = cfg
        self.crop_size = cfg.crop_net_config().crop_size
        self.version = version
        self.classes = CATEGORY_NAMES[: cfg.n_classes]

    @classmethod
    def untrained(cls, cfg: DetectorConfig) -> Detector:
        ecfg = cfg.crop_net_config()
        return cls(DetNet(ecfg.width, cfg.n_classes),
                   BoxRefiner(cfg.n_classes, ecfg.width, ecfg.dim), cfg,
                   "untrained")

    @classmethod
    def load(cls, model_dir: Path | str) -> Detector:
        model_dir = Path(model_dir)
        saved = json.loads((model_dir / CONFIG_FILE).read_text())
        reason = _outdated(saved)
        if reason:
            raise InvalidInput(f"{model_dir} was trained by an older meshserve ({reason}); "
                               "train a new one with `meshserve train`")
        saved.pop("weights_layout")
        cfg = DetectorConfig(**saved)
        state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        det = cls.untrained(cfg)
        det.net.load_state_dict(state["net"])
        det.refiner.load_state_dict(state["refiner"])
        det.version = model_dir.name
        return det

    def save(self, model_dir: Path) -> None:
        model_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"net": self.net.state_dict(), "refiner": self.refiner.state_dict()},
                   model_dir / WEIGHTS_FILE)
        saved = {"weights_layout": WEIGHTS_LAYOUT, **asdict(self.cfg)}
        (model_dir / CONFIG_FILE).write_text(json.dumps(saved, indent=2))

    def _maps(self, x: torch.Tensor, mirrored: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DetNet's maps of the letterboxed batch, averaged with those of its mirror image if
        `mirrored`: the mirror's maps are flipped back, its left and right box distances
        swapped."""
        if not mirrored:
            return self.net(x)
        n = len(x)
        obj, box, category = self.net(torch.cat([x, x.flip(3)]))
        return ((obj[:n] + obj[n:].flip(3)) / 2,
                (box[:n] + box[n:].flip(3)[:, [2, 1, 0, 3]]) / 2,
                (category[:n] + category[n:].flip(3)) / 2)

    @torch.inference_mode()
    def propose(self, images: Sequence[np.ndarray], threshold: float, mirrored: bool | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per image: class-agnostic boxes (image pixels, clipped, NMS'd), their objectness and
        DetNet's category probabilities [k, classes] at their centre cells. `mirrored`
        overrides cfg.mirrored_detnet."""
        boxed = [letterbox(img, self.cfg.input_size) for img in images]
        obj_out, box_out, category_out = self._maps(
            to_tensor(np.stack([b[0] for b in boxed])),
            self.cfg.mirrored_detnet if mirrored is None else mirrored)
        category_probs = torch.softmax(category_out, dim=1)
        heat = torch.sigmoid(obj_out)[:, 0]
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
        boxes_all = decode_boxes(box_out)
        n, g, _ = heat.shape
        scores, cells = peaks.reshape(n, -1).topk(min(self.cfg.max_detections, g * g), dim=1)
        out_b, out_s, out_c = [], [], []
        for i, (img, (_, scale)) in enumerate(zip(images, boxed, strict=True)):
            keep = scores[i] > threshold
            s, cell = scores[i][keep], cells[i][keep]
            b = boxes_all[i].reshape(4, -1)[:, cell].t() / scale
            h, w = img.shape[:2]
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            ok = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
            b, s, cell = b[ok], s[ok], cell[ok]
            keep_idx = nms(b, s, self.cfg.nms_iou)
            out_b.append(b[keep_idx])
            out_s.append(s[keep_idx])
            out_c.append(category_probs[i].reshape(category_probs.shape[1], -1)[:, cell[keep_idx]].t())
        return out_b, out_s, out_c

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray], score_threshold: float | None = None
               ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """uint8 [H, W, 3] images → per image boxes float32 [k, 4] (pixels), labels, scores."""
        thr = self.cfg.score_threshold if score_threshold is None else score_threshold
        if len(images) == 0:
            return [], [], []
        images = [np.ascontiguousarray(img, dtype=np.uint8) for img in images]
        proposals, objectness, detnet_categories = self.propose(images, thr)
        probs, refined = self.refiner.refine(images, [b.numpy() for b in proposals],
                                             self.crop_size, self.cfg.view_shift,
                                             [o.numpy() >= self.cfg.look_closer_objectness
                                              for o in objectness])
        out_b, out_l, out_s = [], [], []
        for p, boxes, obj, seen in zip(probs, refined, objectness, detnet_categories, strict=True):
            box_of, labels, score = self._labelled(self._category_probs(p, seen.numpy()),
                                                   obj.numpy(), thr)
            if len(labels):
                kept = batched_nms(torch.from_numpy(boxes[box_of]), torch.from_numpy(score),
                                   torch.from_numpy(labels), self.cfg.nms_iou).numpy()
                box_of, labels, score = box_of[kept], labels[kept], score[kept]  # best first
            out_b.append(boxes[box_of].astype(np.float32))
            out_l.append(labels)
            out_s.append(score)
        return out_b, out_l, out_s

    def _category_probs(self, refiner_probs: np.ndarray, detnet_probs: np.ndarray) -> np.ndarray:
        """The refiner's category probabilities [k, classes], their split mixed with DetNet's at
        detnet_category_weight; what the refiner gives to background stays background."""
        product = 1.0 - refiner_probs[:, -1:]
        split = refiner_probs[:, :-1] / np.maximum(product, 1e-6)
        w = self.cfg.detnet_category_weight
        return ((1 - w) * split + w * detnet_probs) * product

    def _labelled(self, category_probs: np.ndarray, objectness: np.ndarray, threshold: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(box index, category, score) of every labelling a box gets: its best categories,
        each at least label_ratio as likely as the first; score = √objectness × probability
        (DetNet's objectness at half weight ranks the refiner's answers better: +0.002 AP)."""
        top = np.argsort(-category_probs, axis=1)[:, :self.cfg.labels_per_box]
        box_of = np.repeat(np.arange(len(top)), top.shape[1])
        labels = top.ravel().astype(np.int64)
        prob = category_probs[box_of, labels]
        best = category_probs[box_of, top[box_of, 0]]
        score = (np.sqrt(objectness[box_of]) * prob).astype(np.float32)
        keep = (score >= threshold) & (prob >= self.cfg.label_ratio * best)
        return box_of[keep], labels[keep], score[keep]


# --------------------------------------------------------------------------- training


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


SIGNATURE = {
    "inputs": {"image": {"dtype": "BYTES", "shape": [1], "doc": "an encoded JPEG/PNG photo"}},
    "outputs": {
        "boxes": {"dtype": "FP32", "shape": [-1, 4], "doc": "x0, y0, x1, y1 in image pixels"},
        "labels": {"dtype": "INT64", "shape": [-1], "doc": "category index"},
        "scores": {"dtype": "FP32", "shape": [-1]},
    },
    "labels": list(CATEGORY_NAMES),
}


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
    write_card(out_dir, ModelCard(kind="detector", version=out_dir.name, data_seed=data_seed,
                                  metrics=metrics, signature=SIGNATURE,
                                  training_time_s=round(training_time, 2), config=asdict(cfg),
                                  name="detector"))
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
