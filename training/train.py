"""`meshserve train`: catalogue → every model → held-out evaluation → versioned artifacts + cards."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshserve import warehouse
from meshserve.inference import artifacts

log = logging.getLogger(__name__)

STAGES = ("detector", "embedder", "classifier", "shipping")


@dataclass(frozen=True)
class TrainPlan:
    """What one `meshserve train` run does."""

    quick: bool = False
    seed: int | None = None  # catalogue data seed; None: keep the stored catalogue or the default
    n_items: int | None = None
    only: tuple[str, ...] = STAGES
    home: Path | None = None
    progress: bool = True
    tiny: bool = False  # seconds-long configs for tests; never for real models

    def __post_init__(self) -> None:
        unknown = set(self.only) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown model kinds {sorted(unknown)}; known: {', '.join(STAGES)}")
        if self.n_items is not None and self.n_items < 20:
            raise ValueError("--items must be at least 20 (a held-out split needs positives)")


@dataclass
class StageResult:
    kind: str
    status: str  # trained, skipped, failed
    seconds: float = 0.0
    version: str = ""
    path: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def ensure_catalogue(plan: TrainPlan) -> tuple[list, int]:
    """The stored catalogue, built first when missing or when --seed/--items ask for another."""
    from meshserve.training import catalogue as cat

    path = warehouse.catalogue_path(plan.home)
    want_seed = plan.seed if plan.seed is not None else cat.DEFAULT_SEED
    want_n = plan.n_items if plan.n_items is not None else cat.DEFAULT_ITEMS
    rebuild = not path.is_file()
    if not rebuild:
        meta = cat.catalogue_meta(plan.home)
        stored = (int(meta.get("seed", -1)), int(meta.get("n_items", -1)))
        asked = plan.seed is not None or plan.n_items is not None
        if asked and stored != (want_seed, want_n):
            print(f"catalogue at {path} has seed {stored[0]} / {stored[1]} items; "
                  f"rebuilding with seed {want_seed} / {want_n} items", file=sys.stderr)
            rebuild = True
        else:
            want_seed = stored[0]
    if rebuild:
        cat.build_catalogue(want_n, want_seed, plan.home)
    items = cat.load_items(plan.home)
    return items, want_seed


def _bar(total: int, desc: str, on: bool):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="model", leave=False, disable=not on)


def train_classifier_stage(plan: TrainPlan, items: list, seed: int) -> StageResult:
    from meshserve.inference.classifiers import ClassifierConfig
    from meshserve.inference.vocabulary import VIOLATIONS
    from meshserve.training.classifiers import train_classifiers

    config = ClassifierConfig(epochs=30, buckets=1 << 12) if plan.tiny else ClassifierConfig()
    with _bar(len(VIOLATIONS), "train classifiers", plan.progress) as bar:
        root, metrics = train_classifiers(items, config=config, data_seed=seed, home=plan.home,
                                          progress=bar)
    summary = {f"auc_{name}": m["roc_auc"] for name, m in metrics.items()}
    return StageResult("classifier", "trained", version=root.name, path=str(root), metrics=summary)


def train_shipping_stage(plan: TrainPlan, items: list, seed: int) -> StageResult:
    from meshserve.training.shipping import train_shipping

    root, metrics = train_shipping(items, data_seed=seed, home=plan.home)
    summary = {"accuracy": metrics["accuracy"],
               "majority_baseline": metrics["majority_baseline_accuracy"]}
    return StageResult("shipping", "trained", version=root.name, path=str(root), metrics=summary)


def train_embedder_stage(plan: TrainPlan, items: list, seed: int) -> StageResult:
    from meshserve.inference.embedder import EmbedderConfig
    from meshserve.training.embedder import train_embedder

    cfg = EmbedderConfig.tiny() if plan.tiny else (
        EmbedderConfig.quick() if plan.quick else EmbedderConfig())
    version, root = artifacts.new_version("embedder", plan.home)
    # train_embedder evaluates on held-out photos and writes the card itself.
    metrics = train_embedder(cfg, root, plan.progress, items=items, data_seed=seed)
    keys = ("recall@1", "recall@10", "histogram_recall@10")
    return StageResult("embedder", "trained", version=version, path=str(root),
                       metrics={k: metrics[k] for k in keys if k in metrics})


def train_detector_stage(plan: TrainPlan, items: list, seed: int) -> StageResult:
    from meshserve.inference.detector import DetectorConfig
    from meshserve.training.detector import train_detector

    cfg = DetectorConfig.tiny() if plan.tiny else (
        DetectorConfig.quick() if plan.quick else DetectorConfig())
    version, root = artifacts.new_version("detector", plan.home)
    metrics = train_detector(cfg, root, plan.progress, items=items, data_seed=seed)
    keys = ("ap50", "ap50_class_agnostic")
    return StageResult("detector", "trained", version=version, path=str(root),
                       metrics={k: metrics[k] for k in keys if k in metrics})


STAGE_FUNCS: dict[str, Callable[[TrainPlan, list, int], StageResult]] = {
    "detector": train_detector_stage,
    "embedder": train_embedder_stage,
    "classifier": train_classifier_stage,
    "shipping": train_shipping_stage,
}


def run(plan: TrainPlan) -> tuple[list[StageResult], dict[str, Any]]:
    """Every requested stage in order; one failing stage is reported and the rest still run."""
    total = artifacts.Stopwatch()
    items, seed = ensure_catalogue(plan)
    info = {"items": len(items), "data_seed": seed, "home": str(plan.home or artifacts.meshserve_home())}
    results: list[StageResult] = []
    for kind in STAGES:
        if kind not in plan.only:
            continue
        watch = artifacts.Stopwatch()
        try:
            result = STAGE_FUNCS[kind](plan, items, seed)
        except Exception as exc:  # noqa: BLE001 - report it, train the others
            log.exception("training %s failed", kind)
            result = StageResult(kind, "failed", note=f"{type(exc).__name__}: {exc}")
        result.seconds = round(watch.elapsed, 1)
        results.append(result)
    info["total_s"] = round(total.elapsed, 1)
    return results, info


def summary_table(results: Sequence[StageResult], info: dict[str, Any]) -> str:
    rows = [("model", "status", "version", "time", "metrics")]
    for r in results:
        metrics = ", ".join(f"{k}={v}" for k, v in r.metrics.items()) or r.note
        rows.append((r.kind, r.status, r.version or "-", f"{r.seconds:.1f}s", metrics))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"catalogue: {info['items']} items, data seed {info['data_seed']}, home {info['home']}",
    ]
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    lines.append(f"total {info['total_s']:.1f}s")
    return "\n".join(lines)
