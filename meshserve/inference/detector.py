"""The product detector at inference: DetNet's centre-heatmap proposals, named and tightened by the box refiner."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import batched_nms, nms
from torchvision.ops.misc import Conv2dNormActivation as ConvBN

from meshserve.errors import InvalidInput
from meshserve.inference.embedder import EmbedderConfig, EmbedNet, conv_stages, stage_channels
from meshserve.inference.refiner import BoxRefiner
from meshserve.inference.vocabulary import CATEGORY_NAMES

WEIGHTS_FILE = "detector.pt"
CONFIG_FILE = "detector.json"
# Written beside the config; raised whenever the saved weights change shape, so that an artifact
# of an older layout is refused with a message instead of a state-dict error. 1: DetNet with its
# own backbone (no number saved); 2: DetNet on the crop network's conv stages, with a category
# head; 3: the refiner's category head reads the pooled features and the box's shape, its box
# corrections the last stage's map.
WEIGHTS_LAYOUT = 3
STRIDE = 8
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


def max_outputs(saved: Mapping[str, Any]) -> int:
    """Rows per image in a served reply, from a saved config: every box the detector keeps,
    under each category it reports."""
    per_box = int(saved.get("labels_per_box", DetectorConfig.labels_per_box))
    return int(saved["max_detections"]) * per_box


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
