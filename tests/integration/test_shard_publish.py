"""`meshserve shard publish|list|retire` with real indexers and the dev agent: shards come and go
through the registry, a killed indexer turns critical and is reaped."""

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

from meshserve.gateway.model_wire import shards_request
from meshserve.inference.shards import build_shard
from meshserve.v1 import prediction_pb2, prediction_pb2_grpc
from tests.conftest import DevAgent
from tests.support import meshserve_argv, wait_until


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """MESHSERVE_HOME for the CLI; every indexer published from it is killed at the end."""
    home = tmp_path / "home"
    yield home
    for record in (home / "run" / "indexers").glob("*.json"):
        pid = json.loads(record.read_text())["pid"]
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cli(home: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(meshserve_argv(*args), env={**os.environ, "MESHSERVE_HOME": str(home)},
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def make_shards(root: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    dirs = []
    for s in range(count):
        vectors = rng.normal(size=(100, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        path = root / f"day-{s}"
        build_shard(path, vectors, np.arange(s * 100, s * 100 + 100), index="catalogue",
                    shard=f"day-{s}", embedder_version="emb-1", generation=3)
        dirs.append(path)
    return dirs


def grouped_search(target: str, shards: list[str]) -> dict[str, prediction_pb2.ShardResult]:
    """One grouped indexer call (PredictRequest.shards) with a query of make_shards' dim; each shard's result."""
    request = shards_request(np.full((1, 8), 8**-0.5, np.float32), 3, "emb-1", shards)
    with grpc.insecure_channel(target) as channel:
        reply = prediction_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    return {result.shard: result for result in reply.shard_results}


def indexer_entries(agent: DevAgent, passing: bool = False) -> list[dict]:
    return consul.Consul(host="127.0.0.1", port=agent.port).health.service(
        "meshserve-indexer", passing=passing)[1]  # fmt: skip


def test_publish_list_retire_and_reap(start_dev_agent, home: Path, tmp_path: Path) -> None:
    agent = start_dev_agent(["--reap-interval", "500ms", "--min-deregister-after", "1s"])
    shard_dirs = make_shards(tmp_path, 3)
    for shard_dir in shard_dirs:
        done = cli(home, "shard", "publish", str(shard_dir), "--consul", agent.http_addr,
                   "--check-interval", "1", "--deregister-after", "6")
        assert done.returncode == 0, done.stderr
        assert f"published shard {shard_dir.name} of catalogue" in done.stdout

    entries = indexer_entries(agent, passing=True)
    assert sorted(e["Service"]["Meta"]["shard"] for e in entries) == ["day-0", "day-1", "day-2"]
    for entry in entries:
        meta = entry["Service"]["Meta"]
        assert meta["embedder_version"] == "emb-1" and meta["count"] == "100" and meta["dim"] == "8"
        assert meta["generation"] == "3" and meta["role"] == "indexer" and meta["index"] == "catalogue"

    status = cli(home, "status", "--consul", agent.http_addr)
    assert status.returncode == 0 and "coverage 1.00" in status.stdout, status.stderr
    listed = json.loads(cli(home, "shard", "list", "--json", "--consul", agent.http_addr).stdout)
    assert [(row["shard"], row["status"]) for row in listed] == [
        ("day-0", "passing"), ("day-1", "passing"), ("day-2", "passing")]

    # retire day-1: gone from the registry within seconds of the command starting its work
    # (timed from its first line, so a slow interpreter start on a busy machine is not counted)
    retiring = subprocess.Popen(meshserve_argv("shard", "retire", "day-1", "--consul", agent.http_addr),
                                env={**os.environ, "MESHSERVE_HOME": str(home)},
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert retiring.stdout is not None
        assert retiring.stdout.readline().startswith("retiring shard day-1")
        started = time.monotonic()
        wait_until(lambda: "day-1" not in {e["Service"]["Meta"]["shard"] for e in indexer_entries(agent)},
                   timeout=10, interval=0.01, what="day-1 deregistered")  # fmt: skip
        gone_after = time.monotonic() - started
        out, _ = retiring.communicate(timeout=30)
    finally:
        retiring.kill()
        retiring.wait()
    assert retiring.returncode == 0 and "retired meshserve-indexer-" in out
    assert gone_after < 5.0  # deregistered at once; generous for a loaded 2-core machine

    # SIGKILL the day-2 indexer: critical within interval + timeout, then reaped
    [record] = [json.loads(p.read_text()) for p in (home / "run" / "indexers").glob("*.json")
                if json.loads(p.read_text())["shard"] == "day-2"]
    os.kill(record["pid"], signal.SIGKILL)
    killed = time.monotonic()

    def day2_status() -> str:
        return next(c["Status"] for e in indexer_entries(agent) if e["Service"]["Meta"]["shard"] == "day-2"
                    for c in e["Checks"] if c["ServiceID"])  # fmt: skip

    wait_until(lambda: day2_status() == "critical", timeout=30, what="day-2 critical")
    assert time.monotonic() - killed < 2 * (1.0 + 1.0) + 2.0  # twice (interval + timeout), plus slack

    status = json.loads(cli(home, "status", "--json", "--consul", agent.http_addr).stdout)
    [shard_set] = status["shard_sets"]
    assert shard_set["embedder_version"] == "emb-1" and shard_set["coverage"] == 0.5
    assert shard_set["shards"]["day-2"] == {"passing": 0, "registered": 1, "items": 100}
    assert {r["status"] for r in status["services"]["indexer"]} == {"passing", "critical"}
    wait_until(lambda: "day-2" not in {e["Service"]["Meta"]["shard"] for e in indexer_entries(agent)},
               timeout=60, what="day-2 reaped")  # fmt: skip
    assert [e["Service"]["Meta"]["shard"] for e in indexer_entries(agent, passing=True)] == ["day-0"]


def test_publish_refuses_a_damaged_shard_and_registers_nothing(dev_agent: DevAgent, home: Path,
                                                               tmp_path: Path) -> None:  # fmt: skip
    [shard_dir] = make_shards(tmp_path, 1)
    (shard_dir / "ids.npy").write_bytes(b"garbage")
    done = cli(home, "shard", "publish", str(shard_dir), "--consul", dev_agent.http_addr)
    assert done.returncode == 1
    assert "checksum mismatch" in done.stderr
    assert indexer_entries(dev_agent) == []


def test_retire_keeps_a_shard_of_a_grouped_indexer_out(start_dev_agent, spawn, home: Path, tmp_path: Path) -> None:
    """One process serving two shards: `shard retire` takes one out for good (its resync does not put
    it back), the other keeps serving; an instance deregistered without retiring comes back."""
    agent = start_dev_agent()
    day0, day1 = make_shards(tmp_path, 2)
    indexer = spawn(meshserve_argv("serve", "indexer", "--shard", str(day0), "--shard", str(day1), "--port", "0",
                                   "--consul", agent.http_addr, "--check-interval", "0.5", "--resync-interval", "0.3"),
                    name="grouped-indexer", env={**os.environ, "MESHSERVE_HOME": str(home)})  # fmt: skip

    def passing_shards() -> list[str]:
        indexer.check_alive()
        return sorted(e["Service"]["Meta"]["shard"] for e in indexer_entries(agent, passing=True))

    wait_until(lambda: passing_shards() == ["day-0", "day-1"], timeout=90, what="both shards passing")
    api = consul.Consul(host="127.0.0.1", port=agent.port)

    # anti-entropy still works: an instance the agent lost without a retirement is registered again
    [day0_id] = [e["Service"]["ID"] for e in indexer_entries(agent) if e["Service"]["Meta"]["shard"] == "day-0"]
    api.agent.service.deregister(day0_id)
    wait_until(lambda: passing_shards() == ["day-0", "day-1"], timeout=30, what="day-0 registered again")

    done = cli(home, "shard", "retire", "day-1", "--consul", agent.http_addr)
    assert done.returncode == 0, done.stderr
    assert "retired meshserve-indexer-" in done.stdout and done.stdout.strip().endswith("-day-1"), done.stdout
    _, marker = api.kv.get("meshserve/shards/retired/day-1")
    assert marker is not None and json.loads(marker["Value"])["instances"][0].endswith("-day-1")
    wait_until(lambda: "let go of shard day-1" in indexer.output(), timeout=30, what="the server let day-1 go")
    # the process holds day-1 no more: a call naming it is NOT_FOUND with the reason, day-0 still answers
    [entry] = indexer_entries(agent)
    results = grouped_search(f"127.0.0.1:{entry['Service']['Port']}", ["day-0", "day-1"])
    assert results["day-0"].code == 0 and len(results["day-0"].outputs["item_ids"].content) > 0
    assert results["day-1"].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no longer served here: shard day-1 was retired" in results["day-1"].message
    with grpc.insecure_channel(f"127.0.0.1:{entry['Service']['Port']}") as channel:
        described = prediction_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
            prediction_pb2.GetModelMetadataRequest(), timeout=10)  # fmt: skip
    assert described.meta["shards"] == "day-0"
    # the server still resyncs (day-0, lost again, comes back), and day-1 stays out
    [day0_id] = [e["Service"]["ID"] for e in indexer_entries(agent) if e["Service"]["Meta"]["shard"] == "day-0"]
    api.agent.service.deregister(day0_id)
    wait_until(lambda: passing_shards() == ["day-0"], timeout=30, what="day-0 registered again")
    assert {e["Service"]["Meta"]["shard"] for e in indexer_entries(agent)} == {"day-0"}
    assert indexer.output().count("not registering") == 1

    # a process started anew (as `up` restarts a crashed one) keeps the retired shard out as well ...
    again = spawn(meshserve_argv("serve", "indexer", "--shard", str(day1), "--port", "0", "--consul", agent.http_addr,
                                 "--check-interval", "0.5"), name="day-1-again")  # fmt: skip
    wait_until(lambda: again.check_alive() or "shard day-1 was retired" in again.output(), timeout=90,
               what="the new process refusing to register day-1")  # fmt: skip
    assert {e["Service"]["Meta"]["shard"] for e in indexer_entries(agent)} == {"day-0"}
    status = cli(home, "status", "--consul", agent.http_addr)
    assert status.returncode == 0 and "retired (KV meshserve/shards/retired/" in status.stdout, status.stderr
    assert list(json.loads(cli(home, "status", "--json", "--consul", agent.http_addr).stdout)["retired_shards"]) == [
        "day-1"]
    # ... until the shard is published again
    done = cli(home, "shard", "publish", str(day1), "--consul", agent.http_addr, "--check-interval", "1")
    assert done.returncode == 0, done.stderr
    assert api.kv.get("meshserve/shards/retired/day-1")[1] is None
    assert json.loads(cli(home, "status", "--json", "--consul", agent.http_addr).stdout)["retired_shards"] == {}
    assert passing_shards() == ["day-0", "day-1"]
