"""Fixtures shared by the integration tests that need trained models."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MESHSERVE_HOME with an 80-item catalogue and every model kind trained tiny (seconds).

    Read-only for tests: copy it with `home_copy` before anything writes to it.
    """
    import torch

    from meshserve.training.train import TrainPlan, run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        home = tmp_path_factory.mktemp("tiny-home")
        results, _ = run(TrainPlan(n_items=80, seed=7, home=home, progress=False, tiny=True))
    finally:
        torch.set_num_threads(threads)
    assert all(r.status == "trained" for r in results), results
    return home


@pytest.fixture(scope="session")
def home_copy(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """Factory: a private, writable copy of the tiny home."""

    def _copy() -> Path:
        target = tmp_path_factory.mktemp("home") / "home"
        shutil.copytree(tiny_home, target)
        return target

    return _copy


@pytest.fixture
def parts(spawn: Callable[..., Any], start_dev_agent: Callable[..., Any], home_copy: Callable[[], Path]) -> Any:
    """MeshParts over a private copy of the tiny home and a dev agent of this test's own."""
    from tests.integration.mesh_parts import MeshParts

    return MeshParts(spawn, start_dev_agent(), home_copy())
