"""Rendered training and evaluation sets: seed ranges, parallel rendering and an on-disk cache."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from meshserve.children import die_with_parent
from meshserve.errors import InvalidInput
from meshserve.inference.artifacts import meshserve_home
from meshserve.inference.crops import CROP_PAD, crop
from meshserve.training.catalogue import DEFAULT_SEED, Item
from meshserve.training.render import RenderConfig, render_photo

# Photo seeds are split into disjoint ranges so evaluation never sees a training photo.
TRAIN_SEEDS = 0
EVAL_SEEDS = 1_000_000_000
REFERENCE_SEEDS = 2_000_000_000
REFINE_SEEDS = 3_000_000_000  # more detection photos, for the detector's second stage

PHOTO_CONFIG = RenderConfig()  # the photos a buyer takes: detection and query photos
# A listing's own photo: one product, close up, less clutter; the index holds one per item.
LISTING_CONFIG = RenderConfig(size=112, min_scale=0.6, max_scale=0.85, p_distractor=0.2,
                              max_distractors=1, clutter=(3, 8))
# Embedder training views: the same close-up look on a small canvas.
VIEW_CONFIG = RenderConfig(size=80, min_scale=0.5, max_scale=0.9, p_distractor=0.3,
                           max_distractors=1, clutter=(3, 8))


@dataclass(frozen=True)
class PhotoSet:
    """Rendered photos as arrays: images [n, S, S, 3] uint8 and their objects."""

    images: np.ndarray
    boxes: list[np.ndarray]  # per photo float32 [k, 4]
    labels: list[np.ndarray]  # per photo int64 [k]
    item_ids: list[np.ndarray]  # per photo int64 [k]


@dataclass(frozen=True)
class CropSet:
    """Product crops: images [n, C, C, 3] uint8, their item ids and categories."""

    images: np.ndarray
    item_ids: np.ndarray
    labels: np.ndarray


Job = tuple[tuple[Item, ...], int]


def _render_job(args: tuple[Job, RenderConfig, int | None, float]) -> tuple:
    (items, seed), cfg, crop_size, pad = args
    photo = render_photo(list(items), seed, cfg)
    if crop_size is None:
        return photo.image, photo.boxes, photo.labels, photo.item_ids
    crops = np.stack([crop(photo.image, b, crop_size, pad) for b in photo.boxes])
    return crops, photo.boxes, photo.labels, photo.item_ids


def torch_threads(requested: int) -> int:
    """`requested` threads, or with 0 what this process already has (`meshserve train --threads`,
    default 2). Not the cores the load average calls idle: that average counts this very
    training's last minute, so on a quiet machine it halved the threads between stages."""
    if requested > 0:
        return requested
    import torch

    return torch.get_num_threads()


def _workers() -> int:
    env = os.environ.get("MESHSERVE_RENDER_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))


def _worker_signals() -> None:
    """Render workers take the default SIGTERM (the pool ends them with it) and leave Ctrl-C to the
    parent, whatever handlers the parent process had installed when it forked them."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(jobs: Sequence[Job], cfg: RenderConfig, crop_size: int | None, pad: float,
         progress: str | None, bar=None) -> list[tuple]:  # type: ignore[no-untyped-def]
    """Render jobs on the render workers; `bar` (left open) instead of a new one for `progress`."""
    tasks = [(job, cfg, crop_size, pad) for job in jobs]
    workers = _workers()
    own_bar = bar is None
    bar = progress_bar(len(tasks), progress) if own_bar else bar
    out: list[tuple] = []
    if workers == 1 or len(tasks) < 64:
        for t in tasks:
            out.append(_render_job(t))
            bar.update(1)
    else:
        # fork: workers inherit the imported modules, so start-up costs nothing
        with mp.get_context("fork").Pool(workers, initializer=_worker_signals) as pool:
            for res in pool.imap(_render_job, tasks, chunksize=32):
                out.append(res)
                bar.update(1)
    if own_bar:
        bar.close()
    return out


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: object) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str | None, unit: str = "photo"):  # type: ignore[no-untyped-def]
    """A tqdm bar, or one that shows nothing when `desc` is None."""
    if not desc:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=0.5)


def optimiser_step(loss, opt, sched, losses: list[float], bar) -> None:  # type: ignore[no-untyped-def]
    """Backpropagate `loss`, step the optimiser and its schedule, record the loss on `bar`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    losses.append(float(loss.detach()))
    bar.update(1)
    bar.set_postfix(loss=f"{losses[-1]:.3f}")


def loss_ends(losses: Sequence[float]) -> tuple[float, float]:
    """Mean loss over the first and over the last tenth of the steps (at most 20 steps each)."""
    k = max(1, min(20, len(losses) // 10))
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def _cache_file(kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return _renders_dir() / f"{kind}-{digest[:20]}.npz"


def _renders_dir() -> Path:
    return meshserve_home() / "cache" / "renders"


def _items_key(items: Sequence[Item]) -> str:
    return hashlib.sha256(repr([(i.item_id, i.look) for i in items]).encode()).hexdigest()


def photo_jobs(items: Sequence[Item], n_photos: int, seed_base: int, p_two: float,
               seed: int) -> list[Job]:
    """Photo k shows items[k % n] and, with probability p_two, a second random item."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, seed_base, 0x70B5]))
    jobs: list[Job] = []
    for k in range(n_photos):
        first = items[k % len(items)]
        if len(items) > 1 and rng.random() < p_two:
            other = items[int(rng.integers(len(items)))]
            if other.item_id == first.item_id:
                other = items[(k + 1) % len(items)]
            jobs.append(((first, other), seed_base + k))
        else:
            jobs.append(((first,), seed_base + k))
    return jobs


PHOTO_CHUNK = 500  # photos per cache file: a rendering cut short keeps the chunks it finished


def render_photos(items: Sequence[Item], n_photos: int, seed_base: int, *, p_two: float = 0.25,
                  cfg: RenderConfig = PHOTO_CONFIG, seed: int = 0, cache: bool = True,
                  progress: str | None = None) -> PhotoSet:
    """Full photos for detection (training or evaluation). Photo k is the same in every set
    of more than k photos, so a shorter set reads the chunks of a longer one."""
    key = dict(items=_items_key(items), base=seed_base, p_two=p_two, cfg=asdict(cfg), seed=seed,
               chunk=PHOTO_CHUNK, v=3)
    jobs = photo_jobs(items, n_photos, seed_base, p_two, seed)
    bar = progress_bar(len(jobs), progress)
    chunks = []
    for start in range(0, len(jobs), PHOTO_CHUNK):
        part = jobs[start:start + PHOTO_CHUNK]
        path = _cache_file("photos", {**key, "from": start, "count": len(part)})
        if cache and path.is_file():
            chunk = _load_photos(path)
            bar.update(len(chunk.images))
        else:
            results = _run(part, cfg, None, 0.0, progress, bar)
            chunk = PhotoSet(np.stack([r[0] for r in results]), [r[1] for r in results],
                             [r[2] for r in results], [r[3] for r in results])
            if cache:
                _save(path, images=chunk.images, boxes=np.concatenate(chunk.boxes),
                      labels=np.concatenate(chunk.labels), item_ids=np.concatenate(chunk.item_ids),
                      counts=np.asarray([len(b) for b in chunk.boxes]))
        chunks.append(chunk)
    bar.close()
    if len(chunks) == 1:
        return chunks[0]
    return PhotoSet(np.concatenate([c.images for c in chunks]),
                    [b for c in chunks for b in c.boxes], [lab for c in chunks for lab in c.labels],
                    [i for c in chunks for i in c.item_ids])


def _load_photos(path: Path) -> PhotoSet:
    with np.load(path) as z:
        splits = np.cumsum(z["counts"])[:-1]
        return PhotoSet(z["images"], list(np.split(z["boxes"], splits)),
                        list(np.split(z["labels"], splits)), list(np.split(z["item_ids"], splits)))


@dataclass(frozen=True)
class PhotoRequest:
    """The arguments of one render_photos call, so that it can be made ahead of time."""

    items: Sequence[Item]
    n_photos: int
    seed_base: int
    p_two: float = 0.25
    seed: int = 0

    def render(self, progress: str | None = None) -> PhotoSet:
        return render_photos(self.items, self.n_photos, self.seed_base, p_two=self.p_two,
                             seed=self.seed, progress=progress)


@contextmanager
def rendered_meanwhile(requests: Sequence[PhotoRequest]) -> Iterator[None]:
    """Render `requests` into the photo cache in an idle-priority process while the body runs.

    Meant for a body that leaves part of a core idle, as the crop network's training does on
    its view worker's core (0.2 to 0.4 of it). A request still unfinished when the body ends is
    abandoned; its caller renders it then, at full speed, reading the chunks already done.
    """
    child = mp.get_context("fork").Process(target=_render_ahead, args=(requests, os.getpid()),
                                           daemon=True)
    child.start()
    try:
        yield
    finally:
        if child.is_alive():
            child.terminate()
        child.join()
        for leftover in _renders_dir().glob(f".*.{child.pid}.tmp.npz"):  # see _save
            leftover.unlink(missing_ok=True)


def _render_ahead(requests: Sequence[PhotoRequest], parent_pid: int) -> None:
    die_with_parent(parent_pid)
    _worker_signals()
    try:  # run only when a core would otherwise idle
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    os.environ["MESHSERVE_RENDER_WORKERS"] = "1"  # one process, in the gaps the body leaves
    for request in requests:
        request.render()


def render_crops(jobs: Sequence[Job], crop_size: int, cfg: RenderConfig, *, pad: float = CROP_PAD,
                 cache: bool = True, progress: str | None = None) -> CropSet:
    """Every object of every job's photo, cropped at its ground-truth box."""
    key = dict(jobs=hashlib.sha256(repr([([i.item_id for i in it], s) for it, s in jobs]).encode())
               .hexdigest(), items=_items_key([i for it, _ in jobs for i in it]),
               size=crop_size, cfg=asdict(cfg), pad=pad, v=1)
    path = _cache_file("crops", key)
    if cache and path.is_file():
        with np.load(path) as z:
            return CropSet(z["images"], z["item_ids"], z["labels"])
    results = _run(jobs, cfg, crop_size, pad, progress)
    cs = CropSet(np.concatenate([r[0] for r in results]),
                 np.concatenate([r[3] for r in results]), np.concatenate([r[2] for r in results]))
    if cache:
        _save(path, images=cs.images, item_ids=cs.item_ids, labels=cs.labels)
    return cs


def view_jobs(items: Sequence[Item], views: int, seed_base: int = TRAIN_SEEDS) -> list[Job]:
    """`views` single-product photos per item, seeds disjoint per view."""
    return [((it,), seed_base + v * 10_000_000 + it.item_id) for v in range(views) for it in items]


def reference_jobs(items: Sequence[Item]) -> list[Job]:
    """The one listing photo per item that an index holds."""
    return [((it,), REFERENCE_SEEDS + it.item_id) for it in items]


def resolve_items(items: Sequence[Item] | None, data_seed: int | None
                  ) -> tuple[Sequence[Item], int]:
    """The items to train on and their data seed: given ones, else the warehouse's."""
    if items is None:
        from meshserve.training.catalogue import catalogue_meta, load_items

        items = load_items()
        if data_seed is None:
            data_seed = int(catalogue_meta()["seed"])
    if not items:
        raise InvalidInput("no items to train on")
    return items, int(DEFAULT_SEED if data_seed is None else data_seed)


def _save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
