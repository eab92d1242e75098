"""The whole mesh as real processes (dev agent, 2 detectors, 2 embedders, 4 shards, gateway) over tiny
trained models, in one module-wide mesh that each test gets back as it was started (whatever an
earlier test killed, added or stopped is put back first, so no test depends on the order). Results
equal the in-process pipeline's; bad input reaches no model server; the result cache hits, misses,
and never serves an answer across model versions; then the mesh is hurt — an embedder killed, shards
churned, the registry stopped — under a steady search load, and no call fails."""

from __future__ import annotations

import json
import re
import shutil
import signal
import struct
import subprocess
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from meshserve.local.demo import held_out_photos
from meshserve.local.inprocess import InProcessSearch
from meshserve.local.mesh import LocalMesh, MeshConfig, MeshInfo
from meshserve.local.supervisor import Child, ChildSpec
from meshserve.v1 import photo_search_pb2, photo_search_pb2_grpc
from tests.integration.load import SearchLoad
from tests.support import free_port, meshserve_argv, wait_until

# Longer than the longest wait of any test here plus the mesh's start (up to 240 s) in the first one.
pytestmark = pytest.mark.timeout(900)

MIN_SCORE = 0.01  # tiny models are unsure of everything; low enough that every photo has detections
Mesh = tuple[LocalMesh, MeshInfo]


@pytest.fixture(scope="module")
def started_mesh(home_copy: Callable[[], Path]) -> Iterator[tuple[Mesh, dict[str, ChildSpec]]]:
    """The mesh, and what it was started with: child name → spec."""
    home = home_copy()
    config = MeshConfig(home=home, registry_addr=f"127.0.0.1:{free_port()}", gateway_addr=f"127.0.0.1:{free_port()}",
                        gateway_metrics_port=free_port(), ready_timeout_s=240)  # fmt: skip
    local = LocalMesh(config, say=lambda line: None)
    try:
        info = local.start()
        yield (local, info), {c.spec.name: c.spec for c in local.supervisor.children}
    finally:
        local.stop()
        assert all(not c.alive for c in local.supervisor.children)


@pytest.fixture
def mesh(started_mesh: tuple[Mesh, dict[str, ChildSpec]]) -> Mesh:
    """The module's mesh as it was started (see restore)."""
    (local, info), initial = started_mesh
    restore(local, initial)
    return local, info


def restore(local: LocalMesh, initial: dict[str, ChildSpec]) -> None:
    """Stop the servers a test added, start again those it stopped or killed (the registry first),
    then wait until the gateway routes over the starting shape: 2 detectors, 2 embedders, shards
    base-0…3 all passing and answering."""
    supervisor = local.supervisor
    added = [c for c in supervisor.children if c.alive and c.spec.name not in initial]
    for extra in added:
        extra.proc.send_signal(signal.SIGTERM)  # deregisters, drains
    for extra in added:
        extra.proc.wait(timeout=60)
    alive = {c.spec.name for c in supervisor.children if c.alive}
    if "registry" not in alive:
        supervisor.start(initial["registry"])
        wait_until(lambda: urllib.request.urlopen(f"{local.registry_addr}/v1/status/leader", timeout=1), timeout=60)
    again = [supervisor.start(spec) for name, spec in initial.items() if name not in alive and name != "registry"]
    for started in again:
        supervisor.wait_port(started, 180)

    def as_started() -> bool:
        if not (gateway_metric(local, "meshserve_gateway_replicas", 'stage="detector"') == 2
                and gateway_metric(local, "meshserve_gateway_replicas", 'stage="embedder"') == 2
                and gateway_metric(local, "meshserve_gateway_registry_stale") == 0):
            return False
        photo = held_out_photos(local.config.home, 1)[0].jpeg
        reply = search(local.config.gateway_addr, photo, top_k=100)
        shards = {m.shard for d in reply.detections for m in d.matches}
        return reply.coverage.shards_expected == reply.coverage.shards_answered == 4 and shards == BASE_SHARDS

    wait_until(as_started, timeout=180, interval=0.25, what="the mesh back as it was started")


BASE_SHARDS = {f"base-{i}" for i in range(4)}


@pytest.fixture(scope="module")
def photos(started_mesh: tuple[Mesh, dict[str, ChildSpec]]) -> list[bytes]:
    return [p.jpeg for p in held_out_photos(started_mesh[0][0].config.home, 8)]


def spans(local: LocalMesh) -> list[dict]:
    """Every span the mesh's processes have exported so far (JSON lines; a line being written is skipped)."""
    out = []
    for line in local.trace_file.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


MODEL_SERVICES = {"meshserve-detector", "meshserve-embedder", "meshserve-indexer"}


def model_server_calls(local: LocalMesh, since_ns: int, until_ns: int) -> list[dict]:
    """Server spans of detectors, embedders and indexers that began in [since_ns, until_ns) (wall clock)."""
    return [s for s in spans(local) if s.get("service") in MODEL_SERVICES and s.get("kind") == "SERVER"
            and since_ns <= s["start_ns"] < until_ns]  # fmt: skip


def calls_to(local: LocalMesh, stage: str, target: str) -> int:
    """The gateway's calls to one replica (its client spans are named "<stage> → <host:port>")."""
    return sum(1 for s in spans(local) if s.get("service") == "meshserve-gateway"
               and s.get("name") == f"{stage} → {target}")  # fmt: skip


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG of a few dozen bytes whose header claims width × height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def search(target: str, image: bytes, top_k: int = 10, timeout: float = 20,
           no_cache: bool = True) -> photo_search_pb2.SearchResponse:  # fmt: skip
    with grpc.insecure_channel(target) as channel:
        request = photo_search_pb2.SearchRequest(image=image, top_k=top_k, min_detection_score=MIN_SCORE,
                                                 no_cache=no_cache)  # fmt: skip
        return photo_search_pb2_grpc.PhotoSearchStub(channel).Search(request, timeout=timeout)


def gateway_metric(mesh: LocalMesh, name: str, labels: str = "") -> float:
    port = mesh.config.gateway_metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def child(mesh: LocalMesh, name: str) -> Child:
    return next(c for c in mesh.supervisor.children if c.spec.name == name and c.alive)


def start_server(mesh: LocalMesh, name: str, *args: str) -> Child:
    port_file = mesh.config.run_dir / "ports" / f"{name}.port"
    started = mesh.supervisor.start(ChildSpec(name, (*args, "--port", "0", "--port-file", str(port_file),
                                                     "--check-interval", "1"), port_file=port_file))  # fmt: skip
    mesh.supervisor.wait_port(started, 120)
    return started


# -- the mesh answers like the in-process pipeline ------------------------------------------


def assert_same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]], tol: float = 1e-4) -> None:
    """Equal scores rank by rank; ids equal too, except that items whose scores tie within `tol`
    (served and in-process floats differ in the last bits) may trade places."""
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=tol)
    want_scores = dict(want)
    for (got_id, got_score), (want_id, _) in zip(got, want, strict=True):
        if got_id != want_id:
            tied = abs(want_scores.get(got_id, want[-1][1]) - got_score) <= tol
            assert tied, f"item {got_id} (score {got_score:.6f}) is not a near tie of {want_id}: {got} vs {want}"


def test_search_through_the_mesh_equals_the_in_process_pipeline(mesh: Mesh, photos: list[bytes]) -> None:
    from meshserve.inference.artifacts import latest

    local, info = mesh
    home = local.config.home
    shard_dirs = sorted((local.config.run_dir / "shards").glob("*/base-*"))
    assert len(shard_dirs) == 4
    reference = InProcessSearch(latest("detector", home), latest("embedder", home), shard_dirs)  # type: ignore[arg-type]
    truths = [p.item_ids for p in held_out_photos(home, 8)]
    compared, hits_mesh, hits_local = 0, 0, 0
    for photo, truth in zip(photos[:6], truths, strict=False):
        reply = search(info.gateway, photo)
        want = reference.search(photo, top_k=10, min_score=MIN_SCORE)
        assert reply.coverage.shards_expected == 4 and reply.coverage.shards_answered == 4
        assert [d.label for d in reply.detections] == [d.label for d, _ in want]
        for got, (found, matches) in zip(reply.detections, want, strict=True):
            box = [got.box.x_min, got.box.y_min, got.box.x_max, got.box.y_max]
            np.testing.assert_allclose(box, found.box, atol=1e-3)
            assert_same_ranking([(m.item_id, m.score) for m in got.matches],
                                [(m.item_id, m.score) for m in matches])  # fmt: skip
            assert {m.shard for m in got.matches} <= {f"base-{i}" for i in range(4)}
            compared += len(matches)
        served = {m.item_id for d in reply.detections for m in d.matches}
        local_ids = {m.item_id for _, matches in want for m in matches}
        hits_mesh += sum(str(i) in served for i in truth)
        hits_local += sum(str(i) in local_ids for i in truth)
        assert set(reply.versions) == {"detector", "embedder", "index"} and len(reply.trace_id) == 32
    assert compared > 0
    assert hits_mesh == hits_local  # recall@10 through the mesh equals the in-process pipeline's


@pytest.mark.parametrize(
    "image, top_k, words",
    [
        (b"", 10, "image: empty"),
        (b"definitely not an image", 10, "image"),
        (b"\xff\xd8\xff" + b"\x00" * (9 * 1024 * 1024), 10, "exceeds the limit"),
        (None, -1, "top_k"),
        (None, 101, "top_k"),
        (png_declaring(10_000, 10_000), 10, "decompression bomb"),
    ],
    ids=["empty", "not-an-image", "over-the-size-limit", "top_k-negative", "top_k-too-large", "pixel-bomb-header"],
)
def test_bad_input_is_invalid_argument_and_reaches_no_model_server(
    mesh: Mesh, photos: list[bytes], image: bytes | None, top_k: int, words: str
) -> None:
    local, info = mesh
    before = gateway_metric(local, "meshserve_gateway_stage_seconds_count", 'stage="detect"')
    since = time.time_ns()
    with pytest.raises(grpc.RpcError) as caught:
        search(info.gateway, photos[0] if image is None else image, top_k=top_k)
    until = time.time_ns()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in caught.value.details()
    assert gateway_metric(local, "meshserve_gateway_stage_seconds_count", 'stage="detect"') == before
    # A good search after it: once its own calls are in the traces, everything before them is too.
    good = search(info.gateway, photos[0])
    wait_until(lambda: any(s["trace_id"] == good.trace_id and s.get("service") == "meshserve-detector"
                           for s in spans(local)), timeout=30, what="the good search's detector span")  # fmt: skip
    assert model_server_calls(local, since, until) == []


def test_the_result_cache_hits_misses_and_never_crosses_model_versions(mesh: Mesh, photos: list[bytes]) -> None:
    from meshserve.inference.artifacts import latest

    local, info = mesh
    photo = photos[1]
    first = search(info.gateway, photo, no_cache=False)
    again = search(info.gateway, photo, no_cache=False)
    other_k = search(info.gateway, photo, top_k=5, no_cache=False)
    assert not first.cached and again.cached and not other_k.cached  # (a no_cache search went before)
    assert again.detections == first.detections and again.versions == first.versions
    assert again.trace_id != first.trace_id  # a hit is still its own request

    # A newer detector version (the same weights under a new version id) takes over the route:
    # the cached answer of the old version must not be served for it.
    current = latest("detector", local.config.home)
    assert current is not None
    newer = current.parent / f"{current.name}-9"
    if not newer.exists():
        shutil.copytree(current, newer)
        card = json.loads((newer / "card.json").read_text())
        card["version"] = newer.name
        (newer / "card.json").write_text(json.dumps(card))
    try:
        start_server(local, "detector-newer", "serve", "detector", "--model", str(newer))
        wait_until(lambda: search(info.gateway, photo).versions["detector"] == newer.name, timeout=60)
        crossed = search(info.gateway, photo, no_cache=False)
        assert crossed.versions["detector"] == newer.name and not crossed.cached
        assert search(info.gateway, photo, no_cache=False).cached  # the new version's answer is cached in turn
    finally:
        shutil.rmtree(newer)  # (its server has loaded it; the next test's restore stops that server)


def test_search_cli_json_has_the_contract_shape(mesh: Mesh, photos: list[bytes], tmp_path: Path) -> None:
    local, info = mesh
    image = tmp_path / "query.jpg"
    image.write_bytes(photos[2])
    argv = meshserve_argv("search", str(image), "--gateway", info.gateway, "--json", "--min-score", str(MIN_SCORE))
    done = subprocess.run([*argv, "--top-k", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"detections", "coverage", "versions", "trace_id"}
    assert result["coverage"] == 1.0 and re.fullmatch(r"[0-9a-f]{32}", result["trace_id"])
    assert set(result["versions"]) == {"detector", "embedder", "index"}
    assert result["detections"], "every held-out photo has detections at MIN_SCORE"
    for detection in result["detections"]:
        assert set(detection) == {"box", "label", "score", "matches"}
        assert len(detection["box"]) == 4 and all(isinstance(v, float) for v in detection["box"])
        assert isinstance(detection["label"], str) and 0.0 <= detection["score"] <= 1.0
        assert 1 <= len(detection["matches"]) <= 3
        for match in detection["matches"]:
            assert set(match) == {"item_id", "score", "shard"}
            assert match["item_id"].isdigit() and match["shard"] in BASE_SHARDS and isinstance(match["score"], float)
    refused = subprocess.run([*argv, "--top-k", "101"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "INVALID_ARGUMENT" in refused.stderr and "top_k" in refused.stderr, refused.stderr


# -- the mesh hurt under load ----------------------------------------------------------------


def test_losing_an_embedder_replica_under_load_fails_no_call(mesh: Mesh, photos: list[bytes]) -> None:
    local, info = mesh
    victim = child(local, "embedder-0")
    target = f"127.0.0.1:{victim.port()}"
    with SearchLoad(info.gateway, photos, rate=8) as load:
        # the replica to be killed takes its share of the load first
        wait_until(lambda: calls_to(local, "embedder", target) >= 5 and len(load.outcomes) >= 20, timeout=60,
                   what="the victim taking traffic")  # fmt: skip
        served_before = calls_to(local, "embedder", target)
        killed_at = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL)
        wait_until(lambda: sum(o.started > killed_at for o in load.outcomes) >= 40, timeout=60,
                   what="40 searches after the kill")  # fmt: skip
    after_kill = [o for o in load.outcomes if o.started > killed_at]
    assert load.failures() == [], load.failures()[:3]
    assert len(after_kill) >= 40 and all(o.coverage == (4, 4) for o in after_kill)
    before, after = load.p99_ms(until=killed_at), load.p99_ms(since=killed_at)
    print(f"\nembedder replica loss: {len(load.outcomes)} searches ({len(after_kill)} after the kill), 0 failed; "
          f"the killed replica had served {served_before} calls; p99 {before:.0f} ms before, "
          f"{after:.0f} ms after the kill (bump ×{after / before:.2f})")


def test_shard_churn_under_load_fails_no_call_and_shows_in_results(mesh: Mesh, photos: list[bytes]) -> None:
    from meshserve.training.catalogue import append_items
    from meshserve.training.shard_build import ItemSlice, build_from_catalogue

    local, info = mesh
    home = local.config.home
    new_items = append_items(10, home)
    fresh_dir = local.config.run_dir / "shards" / "fresh"
    build_from_catalogue(fresh_dir, ItemSlice("ids", new_items[0].item_id, new_items[-1].item_id + 1),
                         shard="fresh", home=home)  # fmt: skip
    new_ids = {str(i.item_id) for i in new_items}
    probe = photos[0]

    def shards_in_results() -> set[str]:  # top_k 100 > every shard's size: each routed shard shows up
        reply = search(info.gateway, probe, top_k=100)
        return {m.shard for d in reply.detections for m in d.matches}

    def coverage() -> tuple[int, int]:
        reply = search(info.gateway, probe, top_k=100)
        return reply.coverage.shards_answered, reply.coverage.shards_expected

    with SearchLoad(info.gateway, photos, rate=6, max_s=120) as load:
        began = time.monotonic()
        # publish: a new indexer for the new listings
        start_server(local, "indexer-fresh", "serve", "indexer", "--shard", str(fresh_dir))
        passing = wait_until(lambda: registry_passing(local, "fresh") and time.monotonic(), timeout=30)
        wait_until(lambda: "fresh" in shards_in_results(), timeout=10, interval=0.05)
        findable_after = time.monotonic() - passing
        reply = search(info.gateway, probe, top_k=100)
        assert new_ids <= {m.item_id for d in reply.detections[:1] for m in d.matches}

        # retire base-3: SIGTERM → NOT_SERVING, deregister, drain
        retiring = child(local, "indexer-base-3")
        retired_at = time.monotonic()
        retiring.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "base-3" not in shards_in_results(), timeout=10, interval=0.05)
        gone_after = time.monotonic() - retired_at

        # SIGKILL base-2: expected but missing until a replacement passes
        child(local, "indexer-base-2").proc.send_signal(signal.SIGKILL)
        missing = wait_until(lambda: coverage() if coverage()[0] < coverage()[1] else None, timeout=15,
                             interval=0.1)  # fmt: skip
        shard_dir = next((local.config.run_dir / "shards").glob("*/base-2"))
        start_server(local, "indexer-base-2-again", "serve", "indexer", "--shard", str(shard_dir))
        wait_until(lambda: coverage()[0] == coverage()[1] == 4, timeout=30, interval=0.1)
        time.sleep(max(0.0, 60 - (time.monotonic() - began)))  # a full minute of steady load

    assert load.failures() == [], load.failures()[:3]
    assert findable_after <= 10.0, findable_after  # within a couple of watch wake-ups, even on a loaded machine
    assert gone_after <= 10.0, gone_after
    assert missing == (3, 4)  # base-0, base-1, fresh answer; base-2 is expected but missing; base-3 retired
    assert any(o.coverage[0] < o.coverage[1] for o in load.outcomes)
    print(f"\nshard churn: {len(load.outcomes)} searches over {time.monotonic() - began:.0f}s, 0 failed; new shard "
          f"findable {findable_after:.2f}s after passing; retired shard gone after {gone_after:.2f}s; "
          f"killed shard showed as coverage {missing[0]}/{missing[1]}")


def registry_passing(mesh: LocalMesh, shard: str) -> bool:
    url = f"{mesh.registry_addr}/v1/health/service/meshserve-indexer?passing"
    with urllib.request.urlopen(url, timeout=2) as resp:
        return any(e["Service"]["Meta"].get("shard") == shard for e in json.load(resp))


def test_registry_outage_under_load_fails_no_call_and_routes_reconcile(mesh: Mesh, photos: list[bytes]) -> None:
    local, info = mesh
    registry = child(local, "registry")
    with SearchLoad(info.gateway, photos, rate=6, max_s=180) as load:
        wait_until(lambda: len(load.outcomes) >= 10, timeout=60, what="searches before the outage")
        registry.proc.send_signal(signal.SIGTERM)
        registry.proc.wait(timeout=15)
        stopped = time.monotonic()
        wait_until(lambda: gateway_metric(local, "meshserve_gateway_registry_stale") == 1, timeout=40)
        # while the registry is away: one detector dies, a new one starts
        child(local, "detector-1").proc.send_signal(signal.SIGKILL)
        start_server(local, "detector-2", "serve", "detector")
        time.sleep(max(0.0, 30 - (time.monotonic() - stopped)))
        local.supervisor.start(registry.spec)
        wait_until(lambda: gateway_metric(local, "meshserve_gateway_registry_stale") == 0, timeout=30)
        # reconciled: detector-1 gone from the routes, detector-2 in them
        wait_until(lambda: gateway_metric(local, "meshserve_gateway_replicas", 'stage="detector"') == 2, timeout=30)
        settled = len(load.outcomes)
        wait_until(lambda: len(load.outcomes) >= settled + 15, timeout=60, what="searches after reconciling")
    assert load.failures() == [], load.failures()[:3]
    status = json.loads(urllib.request.urlopen(
        f"{local.registry_addr}/v1/health/service/meshserve-detector?passing", timeout=2).read())
    ports = {e["Service"]["Port"] for e in status}
    assert child(local, "detector-2").port() in ports and len(ports) == 2
    print(f"\nregistry outage: {len(load.outcomes)} searches, 0 failed across 30 s without the registry")
