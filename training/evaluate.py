"""Held-out evaluation: detection AP@0.5, same-item recall@k, and a colour-histogram baseline."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from meshserve.inference.crops import CROP_PAD, crop
from meshserve.training.catalogue import Item
from meshserve.training.datasets import (
    EVAL_SEEDS,
    LISTING_CONFIG,
    PhotoRequest,
    PhotoSet,
    reference_jobs,
    render_crops,
)

EVAL_P_TWO = 0.25  # a quarter of the evaluation photos show two products


def eval_photos(items: Sequence[Item], n_photos: int | None = None, *,
                progress: bool = False) -> PhotoSet:
    """Photos with seeds no training run uses; photo k shows items[k % n] (+ maybe another)."""
    return eval_request(items, n_photos).render("render eval photos" if progress else None)


def eval_request(items: Sequence[Item], n_photos: int | None = None) -> PhotoRequest:
    return PhotoRequest(items, n_photos or len(items), EVAL_SEEDS, p_two=EVAL_P_TWO)


# --------------------------------------------------------------------------- detection


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes a [n, 4] and b [m, 4] (x0, y0, x1, y1)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]),
                 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]),
                 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _ap_from_matches(scores: np.ndarray, hits: np.ndarray, n_truth: int) -> float:
    """All-point interpolated area under the precision/recall curve (VOC 2010+)."""
    if n_truth == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    fp = np.cumsum(1 - hits[order])
    recall = tp / n_truth
    precision = tp / np.maximum(tp + fp, 1e-9)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def average_precision(
    pred_boxes: Sequence[np.ndarray], pred_labels: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray], true_boxes: Sequence[np.ndarray],
    true_labels: Sequence[np.ndarray], iou: float = 0.5, class_aware: bool = True,
) -> dict[str, float]:
    """AP@iou per class and their mean; greedy matching by score, each truth matched once."""
    classes = sorted({int(c) for t in true_labels for c in t})
    if not class_aware:
        pred_labels = [np.zeros(len(p), dtype=np.int64) for p in pred_labels]
        true_labels = [np.zeros(len(t), dtype=np.int64) for t in true_labels]
        classes = [0]
    per_class: dict[str, float] = {}
    for c in classes:
        scores, hits, n_truth = [], [], 0
        for pb, pl, ps, tb, tl in zip(pred_boxes, pred_labels, pred_scores, true_boxes,
                                      true_labels, strict=True):
            pmask, tmask = np.asarray(pl) == c, np.asarray(tl) == c
            p, s, t = np.asarray(pb).reshape(-1, 4)[pmask], np.asarray(ps)[pmask], \
                np.asarray(tb).reshape(-1, 4)[tmask]
            n_truth += len(t)
            taken = np.zeros(len(t), dtype=bool)
            ious = box_iou(p, t) if len(t) else np.zeros((len(p), 0))
            for j in np.argsort(-s, kind="stable"):
                scores.append(float(s[j]))
                best = -1
                if ious.shape[1]:
                    cand = np.where(taken, -1.0, ious[j])
                    best = int(np.argmax(cand))
                    if cand[best] < iou:
                        best = -1
                if best >= 0:
                    taken[best] = True
                hits.append(1.0 if best >= 0 else 0.0)
        per_class[str(c)] = _ap_from_matches(np.asarray(scores), np.asarray(hits), n_truth)
    values = [v for v in per_class.values() if not np.isnan(v)]
    return {"map": float(np.mean(values)) if values else 0.0, **per_class}


def evaluate_detector(detect: Callable, photos: PhotoSet, batch_size: int = 32) -> dict:
    """`detect(images uint8 [n,H,W,3]) -> (boxes, labels, scores) lists` on held-out photos."""
    pb, pl, ps = [], [], []
    for i in range(0, len(photos.images), batch_size):
        b, lab, s = detect(photos.images[i:i + batch_size])
        pb += list(b)
        pl += list(lab)
        ps += list(s)
    aware = average_precision(pb, pl, ps, photos.boxes, photos.labels)
    # class-agnostic: a box reported under several categories counts once, at its best score
    once = [_best_per_box(b, s) for b, s in zip(pb, ps, strict=True)]
    agnostic = average_precision([b for b, _ in once], [np.zeros(len(s), np.int64) for _, s in once],
                                 [s for _, s in once], photos.boxes, photos.labels,
                                 class_aware=False)
    return {
        "ap50": round(aware["map"], 4),
        "ap50_class_agnostic": round(agnostic["map"], 4),
        "eval_photos": len(photos.images),
        "eval_objects": int(sum(len(b) for b in photos.boxes)),
    }


def _best_per_box(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32)
    order = np.argsort(-scores, kind="stable")
    _, first = np.unique(boxes[order], axis=0, return_index=True)
    keep = order[np.sort(first)]
    return boxes[keep], scores[keep]


# --------------------------------------------------------------------------- retrieval


def recall_at_k(queries: np.ndarray, query_ids: np.ndarray, refs: np.ndarray,
                ref_ids: np.ndarray, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Exact inner-product search: share of queries whose item is among the top k references."""
    sims = np.asarray(queries, dtype=np.float32) @ np.asarray(refs, dtype=np.float32).T
    kmax = min(max(ks), sims.shape[1])
    top = np.argpartition(-sims, kmax - 1, axis=1)[:, :kmax]
    top_sims = np.take_along_axis(sims, top, axis=1)
    top = np.take_along_axis(top, np.argsort(-top_sims, axis=1, kind="stable"), axis=1)
    found = np.asarray(ref_ids)[top] == np.asarray(query_ids)[:, None]
    return {f"recall@{k}": float(found[:, :k].any(axis=1).mean()) for k in ks}


def color_histograms(crops: np.ndarray, bins: int = 4) -> np.ndarray:
    """Joint RGB histograms (bins³), square-rooted and unit-length: cosine = Hellinger affinity."""
    q = (crops.astype(np.int64) * bins) // 256
    idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    flat = idx.reshape(len(crops), -1)
    offsets = np.arange(len(crops))[:, None] * bins**3
    h = np.bincount((flat + offsets).ravel(), minlength=len(crops) * bins**3)
    h = np.sqrt(h.reshape(len(crops), bins**3).astype(np.float32))
    return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-9)


def query_crops(photos: PhotoSet, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every object of the evaluation photos, cropped at its true box, and its item id."""
    crops = [crop(img, b, size, CROP_PAD) for img, boxes in zip(photos.images, photos.boxes,
                                                                 strict=True) for b in boxes]
    return np.stack(crops), np.concatenate(photos.item_ids)


def reference_crops(items: Sequence[Item], size: int, *, progress: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One listing photo per item, cropped at its box: what an index holds."""
    cs = render_crops(reference_jobs(items), size, LISTING_CONFIG,
                      progress="render reference photos" if progress else None)
    return cs.images, cs.item_ids


def evaluate_retrieval(embed_crops: Callable[[np.ndarray], np.ndarray], items: Sequence[Item],
                       photos: PhotoSet, size: int, *, progress: bool = False) -> dict:
    """Recall@1/10 of the embedder and of the colour-histogram baseline, same photos."""
    q_crops, q_ids = query_crops(photos, size)
    r_crops, r_ids = reference_crops(items, size, progress=progress)
    learned = recall_at_k(embed_crops(q_crops), q_ids, embed_crops(r_crops), r_ids)
    hist = recall_at_k(color_histograms(q_crops), q_ids, color_histograms(r_crops), r_ids)
    return {
        "recall@1": round(learned["recall@1"], 4),
        "recall@10": round(learned["recall@10"], 4),
        "histogram_recall@1": round(hist["recall@1"], 4),
        "histogram_recall@10": round(hist["recall@10"], 4),
        "queries": len(q_ids),
        "references": len(r_ids),
    }
