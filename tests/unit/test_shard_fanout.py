"""Grouped shard fan-out: shards grouped by the process that serves them, one real gRPC call per process
to real indexer servicers over real tiny shards, each shard answered as if alone; a shard a process does
not have is asked of another replica, a dead process's shards are missing with their reason."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from meshserve.errors import NotFound
from meshserve.gateway.balancer import ReplicaSet
from meshserve.gateway.photo_search import merge_top_k
from meshserve.gateway.policy import default_policies
from meshserve.gateway.routes import ShardRoute
from meshserve.gateway.shard_fanout import ShardFanOut, plan
from meshserve.inference.shards import HnswParams, build_shard, load_shard
from meshserve.local.mesh import indexer_groups
from meshserve.registry.instances import Instance
from meshserve.rpc.interceptor import StatusInterceptor
from meshserve.servers.batching import Admission, Batcher, BatchingConfig
from meshserve.servers.faults import DelayedModel
from meshserve.servers.indexer import IndexerModel, ShardGroup
from meshserve.servers.model import Model
from meshserve.servers.server import ModelServer, ServerConfig
from meshserve.servers.servicer import SERVICE_NAME, PredictionServicer
from meshserve.v1 import prediction_pb2, prediction_pb2_grpc
from meshserve.wire import tensors

DIM = 16
Serve = Callable[[Model], Awaitable[int]]
SHARDS = ("s0", "s1", "s2")


def unit_vectors(n: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, IndexerModel]:
    root = tmp_path_factory.mktemp("shards")
    models = {}
    for i, shard in enumerate(SHARDS):
        build_shard(root / shard, unit_vectors(200, seed=i), np.arange(1000 * i, 1000 * i + 200), index="catalogue",
                    shard=shard, embedder_version="emb-1", params=HnswParams(M=8, ef_construction=50, ef=50))
        models[shard] = IndexerModel(load_shard(root / shard))
    return models


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a real grpc.aio server around an indexer model (servicer + the status interceptor); its port."""
    servers: list[tuple[grpc.aio.Server, Batcher]] = []

    async def start(model: Model) -> int:
        batcher = Batcher(model, BatchingConfig())
        batcher.start()
        servicer = PredictionServicer(model, batcher, Admission(8), 8)
        servicer.mark_ready()
        server = grpc.aio.server(interceptors=(StatusInterceptor((SERVICE_NAME,), lambda *_: None),))
        servicer.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append((server, batcher))
        return port

    yield start
    for server, batcher in servers:
        await server.stop(None)
        await batcher.close()


def routes(registered: dict[str, Sequence[int]], hedge_ms: float | None = None) -> list[ShardRoute]:
    """Shard → the ports of its registered replicas (one registration per shard and process)."""
    policy = default_policies(hedge_shards_ms=hedge_ms)["indexer"]
    out = []
    for shard, ports in registered.items():
        replicas = ReplicaSet(f"shard {shard}", policy)
        replicas.update([Instance(id=f"idx-{port}-{shard}", name="meshserve-indexer", address="127.0.0.1", port=port)
                         for port in ports])  # fmt: skip
        out.append(ShardRoute(shard, replicas))
    return out


async def close(shard_routes: list[ShardRoute]) -> None:
    for route in shard_routes:
        await route.replicas.close()


async def test_plan_makes_one_leg_per_process_preferring_the_one_that_serves_most() -> None:
    grouped = routes({"s0": [7001, 7002], "s1": [7001], "s2": [7001, 7003], "s3": [7003]})
    legs, stranded = plan(grouped)
    assert not stranded
    assert sorted((leg.target, leg.shards) for leg in legs) == [("127.0.0.1:7001", ("s0", "s1", "s2")),
                                                                ("127.0.0.1:7003", ("s3",))]  # fmt: skip
    # a target a shard already tried is not used for it again; nothing left → stranded
    legs, stranded = plan(grouped, {"s1": {"127.0.0.1:7001"}, "s0": {"127.0.0.1:7001"}})
    assert [r.shard for r in stranded] == ["s1"]
    assert sorted((leg.target, leg.shards) for leg in legs) == [("127.0.0.1:7002", ("s0",)),
                                                                ("127.0.0.1:7003", ("s2", "s3"))]  # fmt: skip
    await close(grouped)


async def test_plan_skips_an_ejected_process_while_another_replica_has_the_shard() -> None:
    grouped = routes({"s0": [7001, 7002], "s1": [7001, 7002]})
    for route in grouped:
        [at_7001] = [r for r in route.replicas.replicas if r.instance.port == 7001]
        at_7001.ejected_until = time.monotonic() + 60
    legs, _ = plan(grouped)
    assert [(leg.target, leg.shards) for leg in legs] == [("127.0.0.1:7002", ("s0", "s1"))]
    await close(grouped)


def test_indexer_groups_deal_the_shards_in_order() -> None:
    dirs = [Path(f"base-{i}") for i in range(5)]
    assert [[d.name for d in g] for g in indexer_groups(dirs, 2)] == [["base-0", "base-1"],
                                                                       ["base-2", "base-3", "base-4"]]
    assert len(indexer_groups(dirs, 0)) == 5 and len(indexer_groups(dirs, 9)) == 5


async def test_one_call_per_process_answers_each_shard_as_if_alone(
    shards: dict[str, IndexerModel], serve: Serve
) -> None:
    both = await serve(ShardGroup([shards["s0"], shards["s1"]]))
    alone = await serve(shards["s2"])
    grouped = routes({"s0": [both], "s1": [both], "s2": [alone]})
    queries = unit_vectors(3, seed=9)
    try:
        fan_out = ShardFanOut(queries, 5, "emb-1", time.monotonic() + 10)
        answers = await fan_out.run(grouped)
    finally:
        await close(grouped)
    assert fan_out.stats.attempts == 2 and fan_out.stats.retries == 0
    params = {"k": 5, "embedder_version": "emb-1"}
    for answer in answers:
        want = shards[answer.shard].predict({"queries": queries}, params)
        np.testing.assert_array_equal(answer.ids, want["item_ids"])
        np.testing.assert_allclose(answer.scores, want["scores"])
    merged = merge_top_k(3, [(a.shard, a.ids, a.scores) for a in answers], 5)  # type: ignore[misc]
    alone_answers = [(s, *(lambda o: (o["item_ids"], o["scores"]))(shards[s].predict({"queries": queries}, params)))
                     for s in SHARDS]  # fmt: skip
    assert merged == merge_top_k(3, alone_answers, 5)


async def test_a_shard_a_process_lacks_is_asked_of_another_and_a_dead_one_is_missing(
    shards: dict[str, IndexerModel], serve: Serve
) -> None:
    both = await serve(ShardGroup([shards["s0"], shards["s1"]]))  # registered for s2 too, which it lacks
    alone = await serve(shards["s2"])
    grouped = routes({"s0": [both], "s1": [both], "s2": [both, alone]})
    try:
        fan_out = ShardFanOut(unit_vectors(2, seed=3), 5, "emb-1", time.monotonic() + 10)
        answers = await fan_out.run(grouped)
        assert [a.ids is not None for a in answers] == [True, True, True]
        assert fan_out.stats.retries == 1 and fan_out.stats.attempts == 2
    finally:
        await close(grouped)

    dead = routes({"s0": [both], "s1": [1], "s2": [1]})  # nothing listens on port 1
    try:
        answers = await ShardFanOut(unit_vectors(2, seed=3), 5, "emb-1", time.monotonic() + 10).run(dead)
    finally:
        await close(dead)
    assert [(a.shard, a.ids is not None, a.reason) for a in answers] == [
        ("s0", True, ""), ("s1", False, "NotReady"), ("s2", False, "NotReady")]


async def test_a_group_refuses_a_call_naming_no_shard_and_bounds_the_names(
    shards: dict[str, IndexerModel], serve: Serve
) -> None:
    group_port = await serve(ShardGroup([shards["s0"], shards["s1"]]))
    alone_port = await serve(shards["s2"])
    request = prediction_pb2.PredictRequest()
    request.inputs["queries"].CopyFrom(tensors.tensor_from(unit_vectors(1, seed=1)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{group_port}") as group, \
            grpc.aio.insecure_channel(f"127.0.0.1:{alone_port}") as alone:  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await prediction_pb2_grpc.PredictionServiceStub(group).Predict(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "PredictRequest.shards" in (refused.value.details() or "")
        # a one-shard server still answers the call that names no shard
        reply = await prediction_pb2_grpc.PredictionServiceStub(alone).Predict(request, timeout=5)
        assert "item_ids" in reply.outputs
        request.shards[:] = ["s0", "s0"]
        with pytest.raises(grpc.aio.AioRpcError) as repeated:
            await prediction_pb2_grpc.PredictionServiceStub(group).Predict(request, timeout=5)
        assert repeated.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        request.shards[:] = ["s1", "nope"]
        request.parameters["embedder_version"].string_value = "emb-2"
        reply = await prediction_pb2_grpc.PredictionServiceStub(group).Predict(request, timeout=5)
        assert [(r.shard, grpc.StatusCode.FAILED_PRECONDITION.value[0] == r.code) for r in reply.shard_results] == [
            ("s1", True), ("nope", False)]
        assert reply.shard_results[1].code == grpc.StatusCode.NOT_FOUND.value[0]


def test_a_group_registers_once_per_shard_at_one_address(shards: dict[str, IndexerModel]) -> None:
    server = ModelServer(ShardGroup([shards["s0"], shards["s1"]]), ServerConfig("meshserve-indexer", register=False))
    registrations = server.instances(50123)
    assert [(r.port, r.meta["shard"], r.meta["version"]) for r in registrations] == [
        (50123, "s0", "emb-1.g1"), (50123, "s1", "emb-1.g1")]
    assert len({r.instance_id for r in registrations}) == 2 and all("shards" not in r.meta for r in registrations)
    one = ModelServer(shards["s2"], ServerConfig("meshserve-indexer", register=False)).instances(50124)
    assert [r.instance_id for r in one] == ["meshserve-indexer-127.0.0.1-50124"]


def test_a_one_shard_server_from_before_grouped_calls_is_read_from_its_outputs() -> None:
    from meshserve.gateway.model_wire import ShardFailure, shard_outcomes

    reply = prediction_pb2.PredictResponse()
    tensors.encode_tensor(np.array([[7, 8]], dtype=np.int64), reply.outputs["item_ids"])
    tensors.encode_tensor(np.array([[0.9, 0.8]], dtype=np.float32), reply.outputs["scores"])
    [(ids, scores)] = shard_outcomes(reply, ["s0"], 1, "shards").values()  # type: ignore[misc]
    assert ids.tolist() == [[7, 8]] and scores[0].tolist() == pytest.approx([0.9, 0.8])
    # with several shards asked, an answer without shard results answers none of them
    both = shard_outcomes(reply, ["s0", "s1"], 1, "shards")
    assert all(isinstance(o, ShardFailure) and o.code == grpc.StatusCode.UNKNOWN for o in both.values())
    # a shard's outputs that do not fit the queries are that shard's failure only
    reply.shard_results.add(shard="s0").outputs["item_ids"].CopyFrom(reply.outputs["item_ids"])
    reply.shard_results[0].outputs["scores"].CopyFrom(reply.outputs["scores"])
    reply.shard_results.add(shard="s1").outputs["item_ids"].CopyFrom(reply.outputs["item_ids"])
    mixed = shard_outcomes(reply, ["s0", "s1"], 1, "shards")
    assert not isinstance(mixed["s0"], ShardFailure) and isinstance(mixed["s1"], ShardFailure)
    assert "scores" in mixed["s1"].message  # type: ignore[union-attr]


async def test_a_slow_call_is_hedged_to_another_process_and_the_first_answer_serves(
    shards: dict[str, IndexerModel], serve: Serve
) -> None:
    hung = await serve(DelayedModel(ShardGroup([shards["s0"], shards["s1"]]), 1000))  # 2 s for the two shards
    fine = await serve(ShardGroup([shards["s0"], shards["s1"]]))
    queries = unit_vectors(2, seed=5)

    async def search(hedge_ms: float | None, budget_s: float) -> tuple[list, ShardFanOut, float]:
        grouped = routes({"s0": [hung, fine], "s1": [hung, fine]}, hedge_ms)
        for route in grouped:  # the plan sends a round to the less busy process first: make that the hung one
            [at_fine] = [r for r in route.replicas.replicas if r.instance.port == fine]
            at_fine.outstanding = 5
        started = time.monotonic()
        try:
            fan_out = ShardFanOut(queries, 5, "emb-1", started + budget_s)
            answers = await fan_out.run(grouped)
        finally:
            await close(grouped)
        return answers, fan_out, time.monotonic() - started

    # without a hedge the hung process holds both shards past the deadline
    answers, fan_out, _ = await search(None, 1.5)
    assert [(a.shard, a.ids is None, a.reason) for a in answers] == [("s0", True, "DeadlineExpired"),
                                                                       ("s1", True, "DeadlineExpired")]  # fmt: skip
    assert fan_out.stats.hedges == 0
    # hedged after 100 ms, the other process answers both, well within the same deadline
    answers, fan_out, took = await search(100.0, 1.5)
    assert fan_out.stats.hedges == 2 and fan_out.stats.attempts == 2 and took < 1.5
    params = {"k": 5, "embedder_version": "emb-1"}
    for answer in answers:
        want = shards[answer.shard].predict({"queries": queries}, params)
        np.testing.assert_array_equal(answer.ids, want["item_ids"])


def test_a_group_lets_go_of_a_retired_shard(tmp_path: Path) -> None:
    """release_shard drops the shard's index from the process (nothing of it stays referenced), later
    calls naming it are NOT_FOUND with the reason, and the other shards answer as before."""
    paths = {}
    for i, shard in enumerate(("s0", "s1")):
        paths[shard] = tmp_path / shard
        build_shard(paths[shard], unit_vectors(50, seed=i), np.arange(100 * i, 100 * i + 50), index="catalogue",
                    shard=shard, embedder_version="emb-1", params=HnswParams(M=8, ef_construction=50, ef=50))
    group = ShardGroup([IndexerModel(load_shard(paths["s0"])), IndexerModel(load_shard(paths["s1"]))])
    retired = weakref.ref(group.members["s1"].shard)
    query = {"queries": unit_vectors(1, seed=9)}
    params = {"k": 3, "embedder_version": "emb-1"}
    before = group.search_shard("s0", query, params)

    assert group.release_shard("s1", "shard s1 was retired")
    assert not group.release_shard("s1", "again") and not group.release_shard("s9", "never served")
    gc.collect()
    assert retired() is None  # the index is freed, not only hidden
    with pytest.raises(NotFound, match="s1.*no longer served here: shard s1 was retired"):
        group.search_shard("s1", query, params)
    after = group.search_shard("s0", query, params)
    assert np.array_equal(after["item_ids"], before["item_ids"])
    assert set(group.shard_meta()) == {"s0"} and group.meta()["shards"] == "s0"
    # a process serving one shard keeps it: releasing it would leave nothing to serve
    assert not IndexerModel(load_shard(paths["s0"])).release_shard("s0", "retired")
