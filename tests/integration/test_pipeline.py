"""`meshserve shard build` and `meshserve pipeline run --once` over a tiny trained embedder: new listings
become a delta shard whose items an indexer finds; retention retires it later."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import consul
import grpc
import numpy as np
import pytest

from meshserve.v1 import prediction_pb2, prediction_pb2_grpc
from meshserve.wire import tensors
from tests.conftest import DevAgent
from tests.support import meshserve_argv


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalogue of 60 items and a tiny embedder, trained in seconds."""
    import torch

    from meshserve.training.train import TrainPlan, run

    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("home")
    results, _ = run(TrainPlan(n_items=60, seed=7, only=("embedder",), home=home, progress=False, tiny=True))
    assert [r.status for r in results] == ["trained"], results
    return home


@pytest.fixture
def home(trained_home: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the trained home (the pipeline appends to its catalogue); indexers it
    published are killed at the end, whatever happened."""
    import shutil

    copy = tmp_path / "home"
    shutil.copytree(trained_home, copy)
    yield copy
    for record in (copy / "run" / "indexers").glob("*.json"):
        try:
            os.killpg(json.loads(record.read_text())["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


# Two pipeline runs of up to 180 s each (cli's own limit) in one test.
pytestmark = pytest.mark.timeout(600)


def cli(home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(meshserve_argv(*args), env={**os.environ, "MESHSERVE_HOME": str(home)},
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def listing_vectors(home: Path, ids: list[int]) -> np.ndarray:
    from meshserve.inference.artifacts import latest
    from meshserve.training.catalogue import load_items
    from meshserve.training.shard_build import embed_listings

    vectors, _ = embed_listings(load_items(home, ids=ids), latest("embedder", home))  # type: ignore[arg-type]
    return vectors


def search(target: str, queries: np.ndarray, k: int) -> np.ndarray:
    request = prediction_pb2.PredictRequest()
    request.inputs["queries"].CopyFrom(tensors.tensor_from(queries))
    request.parameters["k"].int_value = k
    with grpc.insecure_channel(target) as channel:
        reply = prediction_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    return tensors.array_from(reply.outputs["item_ids"])  # type: ignore[return-value]


def test_shard_build_embeds_a_catalogue_slice(home: Path, tmp_path: Path) -> None:
    done = cli(home, "shard", "build", "--items", "ids:10-30", "-o", str(tmp_path / "s"), "--shard", "s-10")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["count"] == 20 and manifest["shard"] == "s-10" and manifest["items"] == "ids [10, 30)"
    assert sorted(np.load(tmp_path / "s" / "ids.npy").tolist()) == list(range(10, 30))

    bad = cli(home, "shard", "build", "--items", "ids:30-10", "-o", str(tmp_path / "x"))
    assert bad.returncode == 2 and "range is empty" in bad.stderr
    empty = cli(home, "shard", "build", "--items", "ids:5000-6000", "-o", str(tmp_path / "y"))
    assert empty.returncode == 1 and "no items" in empty.stderr


def test_pipeline_once_publishes_a_findable_delta_and_retention_retires_it(
    home: Path, start_dev_agent, tmp_path: Path
) -> None:
    agent: DevAgent = start_dev_agent()
    first = cli(home, "pipeline", "run", "--once", "--new-items", "8", "--initial-shards", "2",
                "--consul", agent.http_addr)  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "generation 1: 8 new listings" in first.stdout

    client = consul.Consul(host="127.0.0.1", port=agent.port)
    entries = client.health.service("meshserve-indexer", passing=True)[1]
    by_shard = {e["Service"]["Meta"]["shard"]: e for e in entries}
    assert sorted(by_shard) == ["base-0", "base-1", "delta-g1"]
    assert by_shard["base-0"]["Service"]["Meta"]["count"] == "30"
    assert by_shard["delta-g1"]["Service"]["Meta"]["count"] == "8"

    # the new listings (ids 60..67) are findable through the delta shard's indexer
    delta = by_shard["delta-g1"]["Service"]
    new_ids = list(range(60, 68))
    found = search(f"{delta['Address']}:{delta['Port']}", listing_vectors(home, new_ids), k=1)
    assert found[:, 0].tolist() == new_ids

    time.sleep(1.2)
    second = cli(home, "pipeline", "run", "--once", "--new-items", "4", "--retention", "1s",
                 "--consul", agent.http_addr)  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "retired delta-g1" in second.stdout
    shards = sorted(e["Service"]["Meta"]["shard"] for e in client.health.service("meshserve-indexer")[1])
    assert shards == ["base-0", "base-1", "delta-g2"]
