"""The whole mesh as real processes (dev agent, 2 detectors, 2 embedders, 4 shards, gateway) over tiny
trained models: search results equal the in-process pipeline's; bad input never reaches a stage."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from meshserve.gateway.inprocess import InProcessSearch
from meshserve.local.demo import held_out_photos
from meshserve.local.mesh import LocalMesh, MeshConfig, MeshInfo
from meshserve.v1 import photo_search_pb2, photo_search_pb2_grpc
from tests.support import free_port

MIN_SCORE = 0.01  # tiny models are unsure of everything; low enough that every photo has detections


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, MeshInfo]]:
    import torch

    from meshserve.training.train import TrainPlan, run

    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("home")
    results, _ = run(TrainPlan(n_items=80, seed=7, home=home, progress=False, tiny=True))
    assert all(r.status == "trained" for r in results), results
    config = MeshConfig(home=home, registry_addr=f"127.0.0.1:{free_port()}", gateway_addr=f"127.0.0.1:{free_port()}",
                        gateway_metrics_port=free_port(), ready_timeout_s=240)  # fmt: skip
    local = LocalMesh(config, say=lambda line: None)
    try:
        yield local, local.start()
    finally:
        local.stop()
        assert all(not c.alive for c in local.supervisor.children)


def search(target: str, image: bytes, top_k: int = 10, timeout: float = 10) -> photo_search_pb2.SearchResponse:
    with grpc.insecure_channel(target) as channel:
        request = photo_search_pb2.SearchRequest(image=image, top_k=top_k, min_detection_score=MIN_SCORE)
        return photo_search_pb2_grpc.PhotoSearchStub(channel).Search(request, timeout=timeout)


def stage_calls(mesh: LocalMesh, stage: str) -> float:
    port = mesh.config.gateway_metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    prefix = f'meshserve_gateway_stage_seconds_count{{stage="{stage}"}} '
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def test_search_through_the_mesh_equals_the_in_process_pipeline(mesh: tuple[LocalMesh, MeshInfo]) -> None:
    from meshserve.training.artifacts import latest

    local, info = mesh
    home = local.config.home
    shard_dirs = sorted((local.config.run_dir / "shards").glob("*/base-*"))
    assert len(shard_dirs) == 4
    reference = InProcessSearch(latest("detector", home), latest("embedder", home), shard_dirs)  # type: ignore[arg-type]
    compared = 0
    for photo in held_out_photos(home, 6):
        reply = search(info.gateway, photo.jpeg)
        want = reference.search(photo.jpeg, top_k=10, min_score=MIN_SCORE)
        assert reply.coverage.shards_expected == 4 and reply.coverage.shards_answered == 4
        assert [d.label for d in reply.detections] == [d.label for d, _ in want]
        for got, (found, matches) in zip(reply.detections, want, strict=True):
            box = [got.box.x_min, got.box.y_min, got.box.x_max, got.box.y_max]
            np.testing.assert_allclose(box, found.box, atol=1e-3)
            assert [m.item_id for m in got.matches] == [m.item_id for m in matches]
            np.testing.assert_allclose([m.score for m in got.matches], [m.score for m in matches], atol=1e-4)
            assert {m.shard for m in got.matches} <= {f"base-{i}" for i in range(4)}
            compared += len(matches)
        assert set(reply.versions) == {"detector", "embedder", "index"} and len(reply.trace_id) == 32
    assert compared > 0


@pytest.mark.parametrize(
    "image, top_k, words",
    [
        (b"", 10, "image: empty"),
        (b"definitely not an image", 10, "image"),
        (b"\xff\xd8\xff" + b"\x00" * (9 * 1024 * 1024), 10, "exceeds the limit"),
        (None, -1, "top_k"),
        (None, 101, "top_k"),
    ],
    ids=["empty", "not-an-image", "over-the-size-limit", "top_k-negative", "top_k-too-large"],
)
def test_bad_input_is_invalid_argument_and_reaches_no_stage(
    mesh: tuple[LocalMesh, MeshInfo], image: bytes | None, top_k: int, words: str
) -> None:
    local, info = mesh
    good = held_out_photos(local.config.home, 1)[0].jpeg
    before = stage_calls(local, "detect")
    with pytest.raises(grpc.RpcError) as caught:
        search(info.gateway, good if image is None else image, top_k=top_k)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in caught.value.details()
    assert stage_calls(local, "detect") == before
