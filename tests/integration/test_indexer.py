"""`meshserve serve indexer` as a real process: answers like the shard in-process, refuses bad queries,
and refuses to start (never registering) on a corrupt or unfinished shard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import consul
import grpc
import numpy as np
import pytest

from meshserve.inference.shards import HnswParams, build_shard, load_shard
from meshserve.v1 import prediction_pb2, prediction_pb2_grpc
from meshserve.wire import tensors
from tests.conftest import DevAgent
from tests.support import ManagedProcess, free_port, meshserve_argv, wait_serving, wait_until

DIM = 16


def unit_vectors(n: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shard") / "s1"
    build_shard(
        path,
        unit_vectors(300, seed=0),
        np.arange(5000, 5300),
        index="catalogue",
        shard="s1",
        embedder_version="emb-7",
        params=HnswParams(ef=40),
    )
    return path


def start_indexer(
    spawn: Callable[..., ManagedProcess], shard: Path, *extra: str
) -> tuple[ManagedProcess, str]:
    port = free_port()
    proc = spawn(
        meshserve_argv("serve", "indexer", "--shard", str(shard), "--port", str(port), *extra), name="indexer"
    )
    target = f"127.0.0.1:{port}"
    wait_serving(target, proc)
    return proc, target


def search(target: str, queries: np.ndarray, **params: object) -> prediction_pb2.PredictResponse:
    request = prediction_pb2.PredictRequest()
    request.inputs["queries"].CopyFrom(tensors.tensor_from(queries))
    for name, value in params.items():
        field = "string_value" if isinstance(value, str) else "int_value"
        setattr(request.parameters[name], field, value)
    with grpc.insecure_channel(target) as channel:
        return prediction_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=5)


def test_served_results_equal_in_process_search(spawn, shard_dir: Path) -> None:
    _, target = start_indexer(spawn, shard_dir, "--no-register")
    queries = unit_vectors(20, seed=1)
    reply = search(target, queries, k=7, embedder_version="emb-7")
    ids, scores = tensors.array_from(reply.outputs["item_ids"]), tensors.array_from(reply.outputs["scores"])
    want_ids, want_scores = load_shard(shard_dir).search(queries, 7)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)

    # k beyond the shard: fewer results, not an error
    reply = search(target, queries[:2], k=10_000)
    assert tensors.array_from(reply.outputs["item_ids"]).shape == (2, 300)


def test_bad_queries_get_their_status_and_the_indexer_keeps_serving(spawn, shard_dir: Path) -> None:
    _, target = start_indexer(spawn, shard_dir, "--no-register")
    nan_queries = unit_vectors(3, seed=2)
    nan_queries[1, 4] = np.nan
    inf_queries = unit_vectors(1, seed=2)
    inf_queries[0, 0] = np.inf
    cases = [
        (unit_vectors(2, seed=3)[:, :8].copy(), {}, grpc.StatusCode.INVALID_ARGUMENT, "shape[1]"),
        (nan_queries, {}, grpc.StatusCode.INVALID_ARGUMENT, "NaN or inf"),
        (inf_queries, {}, grpc.StatusCode.INVALID_ARGUMENT, "NaN or inf"),
        (unit_vectors(1, seed=3), {"k": 0}, grpc.StatusCode.INVALID_ARGUMENT, "below the minimum"),
        (unit_vectors(1, seed=3), {"k": -5}, grpc.StatusCode.INVALID_ARGUMENT, "below the minimum"),
        (unit_vectors(1, seed=3), {"k": 10_001}, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the maximum"),
        (np.zeros((0, DIM), np.float32), {}, grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
        (
            unit_vectors(1, seed=3),
            {"embedder_version": "emb-8"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "emb-8",
        ),
    ]
    for queries, params, code, words in cases:
        with pytest.raises(grpc.RpcError) as caught:
            search(target, queries, **params)
        assert caught.value.code() == code, (params, caught.value.details())
        assert words in caught.value.details()
    reply = search(target, unit_vectors(1, seed=4), k=3)
    assert tensors.array_from(reply.outputs["item_ids"]).shape == (1, 3)


def test_registers_with_the_shard_meta(spawn, dev_agent: DevAgent, shard_dir: Path) -> None:
    start_indexer(spawn, shard_dir, "--consul", dev_agent.http_addr, "--check-interval", "0.5")
    client = consul.Consul(host="127.0.0.1", port=dev_agent.port)

    def passing() -> list:
        return client.health.service("meshserve-indexer", passing=True)[1]

    [entry] = wait_until(passing, timeout=15, what="indexer passing in the registry")
    meta = entry["Service"]["Meta"]
    assert {k: meta[k] for k in ("index", "shard", "embedder_version", "dim", "count", "metric")} == {
        "index": "catalogue",
        "shard": "s1",
        "embedder_version": "emb-7",
        "dim": "16",
        "count": "300",
        "metric": "ip",
    }
    assert meta["role"] == "indexer" and meta["generation"] == "1"


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "unfinished"])
def test_a_damaged_shard_never_starts_nor_registers(
    spawn, dev_agent: DevAgent, shard_dir: Path, tmp_path: Path, damage: str
) -> None:
    broken = tmp_path / "broken"
    build_shard(
        broken,
        unit_vectors(50, seed=5),
        np.arange(50),
        index="catalogue",
        shard="b",
        embedder_version="emb-7",
    )
    index_file = broken / "index.bin"
    if damage == "corrupt":
        data = bytearray(index_file.read_bytes())
        data[100] ^= 0x55
        index_file.write_bytes(bytes(data))
    elif damage == "truncate":
        index_file.write_bytes(index_file.read_bytes()[:200])
    else:
        (broken / "manifest.json").unlink()
    proc = spawn(
        meshserve_argv(
            "serve",
            "indexer",
            "--shard",
            str(broken),
            "--port",
            str(free_port()),
            "--consul",
            dev_agent.http_addr,
        ),
        name="broken-indexer",
    )
    assert proc.wait(timeout=30) != 0
    expected = "build did not finish" if damage == "unfinished" else "checksum mismatch"
    assert expected in proc.output()
    client = consul.Consul(host="127.0.0.1", port=dev_agent.port)
    assert client.health.service("meshserve-indexer")[1] == []
