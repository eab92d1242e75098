"""The detector's second stage at inference: a proposal's crop → its category (or background) and a tighter box."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from meshserve.errors import InvalidInput
from meshserve.inference.crops import crop
from meshserve.inference.embedder import EmbedNet, pool_map, pooled_dim, stage_channels, to_tensor

REFINE_PAD = 0.12  # a proposal is grown by this share before cropping, so the true edges are in view
BOX_GRID = 3  # the box corrections read the last stage's map pooled to this many cells a side
ASPECT_SPREAD = 0.15  # about how far one category's boxes spread in ln(width / height)
SURE = 0.95  # at inference, a proposal whose likeliest answer is below this is looked at again


class BoxRefiner(nn.Module):
    """Crop features → category logits plus a background logit (last), from the pooled
    features as in the crop network's category head, and four box corrections from the last
    stage's map.

    A crop is its box stretched to a square, which hides the box's shape, and that shape tells
    categories apart (a phone is narrower than a book): `shape_prior` adds to each logit a
    quadratic in the box's log aspect ratio (see box_shape), a Gaussian prior per category
    (quick, same DetNet, two trainings each: category accuracy on the true boxes of 1,000
    held-out photos 0.949 and 0.949 without it, 0.958 and 0.962 with it; AP@0.5 0.874 and 0.873,
    0.879 and 0.878). The box corrections read that map at BOX_GRID² cells rather than the
    pooled features, which keep little of where things are (quick: DetNet's proposals that
    match a product have mean IoU 0.767; corrected from the pooled features 0.773, from the
    map 0.791).
    """

    def __init__(self, n_classes: int, width: int, dim: int):
        super().__init__()
        self.n_classes = n_classes
        self.features = EmbedNet(dim, width)
        self.classify = nn.Linear(pooled_dim(width), n_classes + 1)
        self.shape_prior = nn.Linear(2, n_classes + 1)
        nn.init.zeros_(self.shape_prior.weight)  # start as the crop network's head
        nn.init.zeros_(self.shape_prior.bias)
        hidden = nn.Linear(stage_channels(width)[-1] * BOX_GRID**2, dim)
        last = nn.Linear(dim, 4)
        nn.init.zeros_(last.weight)  # start by trusting the proposal
        nn.init.zeros_(last.bias)
        self.deltas = nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), last)

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops [n, 3, C, C] and their boxes' box_shape [n, 2] → logits, box corrections."""
        f = self.features.features(x)
        return (self.classify(pool_map(f)) + self.shape_prior(shape),
                self.deltas(F.adaptive_avg_pool2d(f, BOX_GRID)))

    @classmethod
    def from_crop_net(cls, net: EmbedNet, category_head: nn.Linear, width: int, dim: int
                      ) -> BoxRefiner:
        """Features and category weights from the crop network (its category head reads
        EmbedNet.pool); background starts at zero."""
        n_classes = category_head.out_features
        refiner = cls(n_classes, width, dim)
        refiner.features.load_state_dict(net.state_dict())
        with torch.no_grad():
            refiner.classify.weight.zero_()
            refiner.classify.bias.zero_()
            refiner.classify.weight[:n_classes] = category_head.weight
            refiner.classify.bias[:n_classes] = category_head.bias
        return refiner

    @torch.inference_mode()
    def refine(self, images: Sequence[np.ndarray], proposals: Sequence[np.ndarray], crop_size: int,
               view_shift: float = 0.0, look_closer: Sequence[np.ndarray] | None = None
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Proposals [k, 4] (pixels) of each uint8 image → per image class probabilities
        [k, classes + 1] (the last column is background) and corrected boxes [k, 4], clipped.

        Each crop is also seen mirrored. With `view_shift` > 0, a proposal whose likeliest
        answer is below SURE is also looked at moved by that share of its width or height left,
        right, up and down, and the probabilities are averaged over all its views: the category
        read from a loose proposal depends on where its crop happens to sit (AP@0.5 +0.01 full,
        +0.02 quick). `look_closer` (per image, a bool per proposal) limits the mirrored and
        moved views to the proposals it marks. The box correction is never the moved crops'.
        """
        photos = {i: Image.fromarray(img)
                  for i, (img, boxes) in enumerate(zip(images, proposals, strict=True)) if len(boxes)}
        flat = [(photos[i], b) for i, boxes in enumerate(proposals) for b in boxes]
        if flat:
            closer = (np.ones(len(flat), bool) if look_closer is None
                      else np.concatenate([np.asarray(m, bool) for m in look_closer]))
            shapes = box_shape(np.stack([b for _, b in flat]))
            all_probs, all_deltas = self._first_look(
                [crop(img, b, crop_size, REFINE_PAD) for img, b in flat], shapes, closer)
            doubtful = (np.nonzero(closer & (all_probs.max(axis=1) < SURE))[0] if view_shift > 0
                        else np.zeros(0, np.int64))
            if len(doubtful):
                moves = ((view_shift, 0.0), (-view_shift, 0.0), (0.0, view_shift), (0.0, -view_shift))
                moved = self._views([view_crop(*flat[i], dx, dy, crop_size)
                                     for dx, dy in moves for i in doubtful],
                                    np.tile(shapes[doubtful], (len(moves), 1)), len(moves))
                all_probs[doubtful] = (all_probs[doubtful] + len(moves) * moved) / (1 + len(moves))
        probs_out, boxes_out = [], []
        at = 0
        for img, boxes in zip(images, proposals, strict=True):
            k = len(boxes)
            if k == 0:
                probs_out.append(np.zeros((0, self.n_classes + 1), np.float32))
                boxes_out.append(np.zeros((0, 4), np.float32))
                continue
            h, w = img.shape[:2]
            probs_out.append(all_probs[at:at + k])
            boxes_out.append(apply_deltas(boxes, all_deltas[at:at + k], w, h))
            at += k
        return probs_out, boxes_out

    def _first_look(self, crops: list[np.ndarray], shapes: np.ndarray, mirrored: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities and box corrections of each crop, averaged with those of its
        mirror image where `mirrored` says so."""
        x, s = to_tensor(np.stack(crops)), torch.from_numpy(shapes)
        both = torch.from_numpy(np.nonzero(mirrored)[0])
        logits, deltas = self(torch.cat([x, x[both].flip(3)]), torch.cat([s, s[both]]))
        probs = torch.softmax(logits, dim=1)
        k = len(crops)
        probs, mirror_probs = probs[:k].clone(), probs[k:]
        deltas, mirror_deltas = deltas[:k].clone(), unmirror(deltas[k:])
        probs[both] = (probs[both] + mirror_probs) / 2
        deltas[both] = (deltas[both] + mirror_deltas) / 2
        return probs.numpy(), deltas.numpy()

    def _views(self, crops: list[np.ndarray], shapes: np.ndarray, groups: int) -> np.ndarray:
        """Crops in `groups` equal groups, each group one view of the same proposals → class
        probabilities [k, classes + 1] averaged over the groups and their mirror images."""
        x, s = to_tensor(np.stack(crops)), torch.from_numpy(shapes)
        probs = torch.softmax(self(torch.cat([x, x.flip(3)]), torch.cat([s, s]))[0], dim=1)
        return probs.reshape(2 * groups, -1, probs.shape[1]).mean(0).numpy()


def view_crop(image: np.ndarray | Image.Image, box: np.ndarray, dx: float, dy: float,
              crop_size: int) -> np.ndarray:
    """The refiner's crop of the box moved by dx of its width and dy of its height; the unmoved
    crop when the move would take a sliver of a box off the image."""
    w, h = box[2] - box[0], box[3] - box[1]
    moved = np.asarray(box, np.float32) + np.array([dx * w, dy * h, dx * w, dy * h], np.float32)
    try:
        return crop(image, moved, crop_size, REFINE_PAD)
    except InvalidInput:
        return crop(image, box, crop_size, REFINE_PAD)


def box_shape(boxes: np.ndarray) -> np.ndarray:
    """The refiner's view of each box's shape [k, 2]: its log aspect ratio ln(w / h) in units of
    ASPECT_SPREAD, a, and a². In those units the prior's weights are of order one, which a few
    epochs at the refiner's learning rate can reach (in plain ln(w / h) they stayed below 0.3)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    a = np.log(np.maximum(b[:, 2] - b[:, 0], 1e-3) / np.maximum(b[:, 3] - b[:, 1], 1e-3))
    a = a / ASPECT_SPREAD
    return np.stack([a, a * a], 1).astype(np.float32)


def unmirror(deltas: torch.Tensor) -> torch.Tensor:
    """Box corrections of a mirrored crop → those of the crop: left and right swap, x flips sign."""
    return torch.stack([-deltas[:, 2], deltas[:, 1], -deltas[:, 0], deltas[:, 3]], 1)


def apply_deltas(boxes: np.ndarray, deltas: np.ndarray, width: int, height: int) -> np.ndarray:
    """Each proposal's sides moved by its corrections, in proposal widths and heights (the inverse
    of training's box_deltas), clipped to the image; a correction that would leave less than two
    pixels keeps the proposal."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, 1)
    moved = boxes + np.clip(deltas, -1.0, 1.0) * size
    moved[:, 0::2] = moved[:, 0::2].clip(0, width)
    moved[:, 1::2] = moved[:, 1::2].clip(0, height)
    ok = ((moved[:, 2] - moved[:, 0]) >= 2) & ((moved[:, 3] - moved[:, 1]) >= 2)
    return np.where(ok[:, None], moved, boxes).astype(np.float32)
