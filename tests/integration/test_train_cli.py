"""`meshserve train` as a real process: builds the catalogue, writes artifacts with cards, reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from meshserve.inference.artifacts import latest, read_card
from meshserve.inference.vocabulary import VIOLATIONS
from meshserve.training.catalogue import catalogue_meta
from tests.support import meshserve_argv


def run_train(home: Path, *args: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(meshserve_argv("train", "--no-progress", *args), capture_output=True, text=True,
                          timeout=240, env={**os.environ, "MESHSERVE_HOME": str(home)})


def test_train_builds_catalogue_and_writes_carded_artifacts(tmp_path: Path) -> None:
    done = run_train(tmp_path, "--tiny", "--items", "80", "--seed", "9", "--only", "classifier,shipping", "--json")
    assert done.returncode == 0, done.stderr
    assert catalogue_meta(tmp_path)["seed"] == "9" and catalogue_meta(tmp_path)["n_items"] == "80"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    kinds = {r["kind"]: r for r in summary["results"]}
    assert set(kinds) == {"classifier", "shipping"} and {r["status"] for r in kinds.values()} == {"trained"}
    assert "model" in done.stdout and "accuracy=" in done.stdout  # the table
    for kind in ("classifier", "shipping"):
        path = latest(kind, tmp_path)
        assert path is not None and str(path) == kinds[kind]["path"]
        card = read_card(path)
        assert card.kind == kind and card.data_seed == 9 and card.metrics and card.created_at
        assert card.training_time_s >= 0 and card.signature and card.config
    for name in VIOLATIONS:
        assert read_card(latest("classifier", tmp_path) / name).name == name  # type: ignore[operator]
    shipping = read_card(latest("shipping", tmp_path))  # type: ignore[arg-type]
    assert shipping.metrics["accuracy"] > shipping.metrics["majority_baseline_accuracy"]


def test_train_refuses_bad_arguments(tmp_path: Path) -> None:
    bogus = run_train(tmp_path, "--only", "classifier,bogus")
    assert bogus.returncode == 2 and "bogus" in bogus.stderr
    few = run_train(tmp_path, "--items", "5")
    assert few.returncode == 2 and "--items" in few.stderr
    assert latest("classifier", tmp_path) is None
