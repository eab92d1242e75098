"""The unmodified tritonclient (grpc and http, in its own cached venv) against running detector,
embedder, indexer and classifier servers: health, readiness, metadata, and infer outputs equal,
bit for bit, to Predict's on the same input."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from meshserve.inference.shards import build_shard
from meshserve.v1 import prediction_pb2, prediction_pb2_grpc
from meshserve.wire import tensors
from meshserve.wire.signature import Array
from tests.support import ManagedProcess, free_port, meshserve_argv, wait_serving
from tests.tritonclient_env import INSTALL_TIMEOUT_S, tritonclient_python

CLIENT = Path(__file__).resolve().parents[1] / "oip_tritonclient.py"
DIM = 16


@pytest.fixture(scope="module")
def triton_python() -> Path:
    """The cached tritonclient environment (the first run installs it from PyPI)."""
    return tritonclient_python()


@pytest.fixture(scope="module")
def servers(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, str]]]:
    """kind → (gRPC target, HTTP host:port) of one server per kind, each with --http-port."""
    logs = tmp_path_factory.mktemp("oip-logs")
    shard = tmp_path_factory.mktemp("shard") / "s1"
    vectors = np.random.default_rng(0).normal(size=(200, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    build_shard(shard, vectors, np.arange(7000, 7200), index="catalogue", shard="s1", embedder_version="emb-1")
    kinds = {"detector": [], "embedder": [], "classifier": ["--model", "counterfeit"],
             "indexer": ["--shard", str(shard)]}  # fmt: skip
    procs: list[ManagedProcess] = []
    found = {}
    try:
        for kind, extra in kinds.items():
            port, http_port = free_port(), free_port()
            argv = meshserve_argv("serve", kind, "--port", str(port), "--http-port", str(http_port), "--no-register",
                                  *extra)  # fmt: skip
            procs.append(ManagedProcess(argv, logs / f"{kind}.log", env={"MESHSERVE_HOME": str(tiny_home)}))
            found[kind] = (f"127.0.0.1:{port}", f"127.0.0.1:{http_port}")
        for proc, (target, _) in zip(procs, found.values(), strict=True):
            wait_serving(target, proc, timeout=120)
        yield found
    finally:
        for proc in reversed(procs):
            proc.stop()


# -- the same input both ways -------------------------------------------------------------


def wire_input(name: str, value: Array) -> dict[str, Any]:
    if isinstance(value, list):
        return {"name": name, "datatype": "BYTES", "shape": [len(value)],
                "elements": [base64.b64encode(e).decode() for e in value]}  # fmt: skip
    datatype = {"float32": "FP32", "int64": "INT64"}[value.dtype.name]
    return {"name": name, "datatype": datatype, "dtype": value.dtype.str, "shape": list(value.shape),
            "raw": base64.b64encode(value.tobytes()).decode()}  # fmt: skip


def decoded(tensor: dict[str, Any]) -> Array:
    if "elements" in tensor:
        return [base64.b64decode(e) for e in tensor["elements"]]
    raw = base64.b64decode(tensor["raw"])
    return np.frombuffer(raw, dtype=np.dtype(tensor["dtype"])).reshape(tensor["shape"])


def run_tritonclient(python: Path, tmp_path: Path, job: dict[str, Any]) -> dict[str, Any]:
    path = tmp_path / f"{job['model']}.json"
    path.write_text(json.dumps(job))
    proc = subprocess.run([str(python), str(CLIENT), str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def predict(target: str, inputs: dict[str, Array], params: dict[str, float | int]) -> dict[str, Array]:
    request = prediction_pb2.PredictRequest()
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tensors.tensor_from(value))
    for name, number in params.items():
        if isinstance(number, int):
            request.parameters[name].int_value = number
        else:
            request.parameters[name].double_value = number
    with grpc.insecure_channel(target) as channel:
        reply = prediction_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    return {name: tensors.array_from(reply.outputs[name]) for name in reply.outputs}


def check_same_as_predict(
    python: Path, tmp_path: Path, servers: dict[str, tuple[str, str]], kind: str, model: str,
    inputs: dict[str, Array], params: dict[str, float | int],
) -> None:  # fmt: skip
    target, http = servers[kind]
    job = {"grpc": target, "http": http, "model": model, "parameters": params,
           "inputs": [wire_input(n, v) for n, v in inputs.items()]}  # fmt: skip
    seen = run_tritonclient(python, tmp_path, job)
    want = predict(target, inputs, params)
    for form in ("grpc", "http"):
        got = seen[form]
        assert (got["live"], got["ready"], got["model_ready"]) == (True, True, True), form
        meta = got["metadata"]
        assert meta["name"] == model
        assert sorted(o["name"] for o in meta["outputs"]) == sorted(want), form
        # -1 marks the batch dimension (gRPC's JSON spells int64 as strings)
        assert all(int(i["shape"][0]) == -1 for i in meta["inputs"]), meta
        assert set(got["outputs"]) == set(want)
        for name, expected in want.items():
            value = decoded(got["outputs"][name])
            if isinstance(expected, list):
                assert value == expected, (form, name)
            else:
                assert isinstance(value, np.ndarray)
                assert value.dtype == expected.dtype and value.shape == expected.shape, (form, name)
                assert value.tobytes() == expected.tobytes(), (form, name)  # bit for bit


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 600)
def test_tritonclient_drives_every_model_kind_like_predict(
    triton_python: Path, servers: dict[str, tuple[str, str]], tiny_home: Path, tmp_path: Path
) -> None:
    from meshserve.training.catalogue import load_items
    from meshserve.training.render import render_photo

    items = load_items(tiny_home)
    photos = [render_photo(items[i], 40 + i) for i in range(2)]
    images = [p.jpeg for p in photos]
    same: Callable[..., None] = lambda kind, model, inputs, params={}: check_same_as_predict(  # noqa: E731
        triton_python, tmp_path, servers, kind, model, inputs, params
    )
    same("detector", model_name(servers["detector"][0]), {"image": images}, {"min_score": 0.0})
    boxes = photos[0].boxes.astype(np.float32)[None]
    same("embedder", model_name(servers["embedder"][0]), {"image": images[:1], "boxes": boxes})
    queries = np.random.default_rng(3).normal(size=(3, DIM)).astype(np.float32)
    same("indexer", model_name(servers["indexer"][0]), {"queries": queries}, {"k": 5})
    rows = items[:6]
    same("classifier", "counterfeit", {
        "title": [i.title.encode() for i in rows], "description": [i.description.encode() for i in rows],
        "price": np.array([i.price for i in rows], np.float32), "category": [i.category.encode() for i in rows],
    }, {"threshold": 0.25})  # fmt: skip


def model_name(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        meta = prediction_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
            prediction_pb2.GetModelMetadataRequest(), timeout=10
        )
    return meta.name
