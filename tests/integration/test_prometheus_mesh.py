"""A real Prometheus over a real mesh (dev registry, detector, 2 embedders, classifiers, shipping, 2 shards,
gateway, over tiny trained models), started the way `meshserve up --prometheus` starts it: every server is
an `up` target with the labels of its registration, every dashboard query evaluates, `meshserve top` shows
every service in a pseudo-terminal, and a killed replica leaves the targets while a new shard joins them."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshserve.gateway.client import search_photo
from meshserve.local.demo import held_out_photos
from meshserve.local.mesh import Endpoint, LocalMesh, MeshConfig, MeshInfo
from meshserve.local.supervisor import Child, ChildSpec
from meshserve.registry.config import SERVICE_NAMES
from tests.integration.load import SearchLoad
from tests.support import free_port, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "meshserve.json"
# Panels that stay empty while nothing goes wrong: no errors, no retries or ejections, no shard misses,
# no alert.
MAY_BE_EMPTY = {"Predict errors per service version", "Retries, hedges and ejections", "Shard misses by reason",
                "Alerts pending or firing"}
Mesh = tuple[LocalMesh, MeshInfo]


@pytest.fixture(scope="module")
def mesh(home_copy: Callable[[], Path]) -> Iterator[Mesh]:
    config = MeshConfig(home=home_copy(), registry_addr=f"127.0.0.1:{free_port()}",
                        gateway_addr=f"127.0.0.1:{free_port()}", detectors=1, embedders=2, shards=2,
                        ready_timeout_s=240, prometheus_addr=f"127.0.0.1:{free_port()}")  # fmt: skip
    local = LocalMesh(config, say=lambda line: None)
    try:
        yield local, local.start()
    finally:
        local.stop()
        assert all(not c.alive for c in local.supervisor.children)


def prometheus(info: MeshInfo, path: str, **params: str) -> Any:
    assert info.prometheus is not None
    url = f"{info.prometheus}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as resp:
        reply = json.load(resp)
    assert reply["status"] == "success", reply
    return reply["data"]


def targets(info: MeshInfo) -> list[dict[str, Any]]:
    return prometheus(info, "/api/v1/targets", state="active")["activeTargets"]


def query(info: MeshInfo, expr: str) -> list[dict[str, Any]]:
    return prometheus(info, "/api/v1/query", query=expr)["result"]


def service_of(endpoint: Endpoint) -> str:
    return SERVICE_NAMES[endpoint.role]


def instance_id(endpoint: Endpoint) -> str:
    return f"{service_of(endpoint)}-{endpoint.target.replace(':', '-')}"


@pytest.fixture(scope="module")
def served(mesh: Mesh) -> Iterator[int]:
    """Searches through the gateway (the same photos again: cache hits too), then a steady trickle for the
    rest of the module, once Prometheus has two scrapes of every stage's counters (so rates exist)."""
    local, info = mesh
    photos = held_out_photos(local.config.home, 4)
    count = 0
    for _ in range(2):
        for photo in photos:
            search_photo(info.gateway, photo.jpeg, top_k=5, timeout=30, min_score=0.01)
            count += 1
    with SearchLoad(info.gateway, [p.jpeg for p in photos], rate=2, timeout_s=10, max_s=600) as load:
        wait_until(lambda: query(info, f'sum(meshserve_gateway_requests_total{{code="OK"}}) > {count}')
                   and len(query(info, 'sum by (service) (rate(meshserve_server_requests_total{method="Predict"}[1m]))'
                                 ' > 0')) >= 3,
                   timeout=90, interval=0.5, what="Prometheus to see the searches at every stage")  # fmt: skip
        yield count
    assert load.failures() == [], load.failures()[:3]


def test_every_server_is_an_up_target_labelled_from_its_registration(mesh: Mesh, served: int) -> None:
    _, info = mesh
    wanted = {instance_id(e): e for e in info.endpoints}

    def all_up() -> dict[str, dict[str, Any]]:
        found = {t["labels"].get("instance_id"): t for t in targets(info) if t["health"] == "up"}
        return found if set(wanted) <= set(found) else {}

    found = wait_until(all_up, timeout=60, interval=0.5, what=f"targets {sorted(wanted)} up")
    assert set(found) == set(wanted)  # nothing else: the SD server and Prometheus are not mesh services
    for name, endpoint in wanted.items():
        labels = found[name]["labels"]
        assert labels["job"] == "meshserve" and labels["service"] == service_of(endpoint)
        assert labels["role"] and labels["model"] and labels["version"], labels
        if endpoint.role == "indexer":
            assert labels["shard"] == endpoint.name.removeprefix("indexer-") and labels["embedder_version"]
            assert labels["version"] and labels["index"]
        else:
            assert "shard" not in labels
    up = query(info, 'up{job="meshserve"}')
    assert {r["metric"]["instance_id"] for r in up} == set(wanted)
    assert all(r["value"][1] == "1" for r in up)
    # the labels travel with every scraped series: the embedders' Predicts by version
    embedded = query(info, 'sum by (service, version) (meshserve_server_requests_total{method="Predict"})')
    assert {r["metric"]["service"] for r in embedded} >= {"meshserve-detector", "meshserve-embedder",
                                                          "meshserve-indexer"}  # fmt: skip


def test_every_dashboard_query_evaluates_and_returns_series_after_searches(mesh: Mesh, served: int) -> None:
    _, info = mesh
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15

    def empty_panels() -> set[str]:
        return {panel["title"] for panel in panels for target in panel["targets"]
                if not query(info, target["expr"])}  # raises on a query error (HTTP 400)  # fmt: skip

    # rates need two scrapes of a changed counter: the gateway's may trail the servers' by a scrape
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: empty_panels() <= MAY_BE_EMPTY, timeout=60, interval=1)
    empty = empty_panels()
    assert empty <= MAY_BE_EMPTY, f"no series for {sorted(empty - MAY_BE_EMPTY)}"
    # and they say the right things
    replicas = {r["metric"]["service"]: float(r["value"][1])
                for r in query(info, 'count by (service) (up{job="meshserve"} == 1)')}  # fmt: skip
    assert replicas["meshserve-embedder"] == 2 and replicas["meshserve-indexer"] == 2
    stages = {r["metric"]["stage"] for r in query(info, "sum by (stage) (meshserve_gateway_stage_seconds_count)")}
    assert {"detect", "embed", "search", "merge", "enrich"} <= stages


def test_latency_histograms_carry_trace_id_exemplars_into_prometheus(mesh: Mesh, served: int) -> None:
    _, info = mesh
    now = time.time()

    def exemplars(selector: str) -> set[str]:
        data = prometheus(info, "/api/v1/query_exemplars", query=selector, start=str(now - 600), end=str(now + 600))
        return {e["labels"].get("trace_id", "") for series in data for e in series["exemplars"]}

    for selector in ("meshserve_gateway_latency_seconds_bucket", "meshserve_gateway_stage_seconds_bucket",
                     'meshserve_server_latency_seconds_bucket{service="meshserve-indexer"}'):  # fmt: skip
        found = wait_until(lambda sel=selector: exemplars(sel), timeout=30, interval=0.5,
                           what=f"exemplars of {selector}")  # fmt: skip
        assert all(len(t) == 32 and int(t, 16) for t in found), found


def test_the_rules_are_loaded_and_healthy(mesh: Mesh) -> None:
    _, info = mesh
    groups = prometheus(info, "/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} >= {"GatewayErrorBudgetFastBurn", "PhotoSearchCoverageBelowOne",
                                          "RegistryWatchStale", "ServiceWithoutPassingReplica",
                                          "ReplicaFlapping", "PhotoSearchStageP99OverBudget"}  # fmt: skip
    wait_until(lambda: all(r.get("lastEvaluation", "").startswith("2") for r in
                           [r for g in prometheus(info, "/api/v1/rules")["groups"] for r in g["rules"]]),
               timeout=30, interval=0.5, what="every rule evaluated once")  # fmt: skip
    rules = [r for g in prometheus(info, "/api/v1/rules")["groups"] for r in g["rules"]]
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def read_screen(master: int, until: Callable[[str], bool], timeout: float) -> str:
    screen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            screen += chunk.decode(errors="replace")
            frame = screen.rsplit("\x1b[H\x1b[2J", 1)[-1]
            if until(frame):
                return frame
    raise TimeoutError(f"the screen never showed what was expected; last output:\n{screen[-4000:]}")


def _wait_draining(proc: subprocess.Popen, master: int, timeout: float) -> int | None:
    """Wait for `proc` to exit while reading its terminal: a full pty would block its last frames."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                os.read(master, 65536)
            except OSError:
                break
    return proc.wait(timeout=max(0.1, deadline - time.monotonic()))


def test_top_shows_every_service_of_the_running_mesh_in_a_terminal(mesh: Mesh, served: int) -> None:
    local, info = mesh
    services = {service_of(e) for e in info.endpoints}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "meshserve.cli", "top", "--consul", local.registry_addr,
                             "--interval", "1"], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)  # fmt: skip
    os.close(slave)
    try:
        # the second frame has rates: every service, every replica id, the gateway's stages
        frame = read_screen(master, lambda text: "REQ/S" in text and "tot" not in text
                            and all(s in text for s in services) and "coverage" in text, timeout=60)  # fmt: skip
        for endpoint in info.endpoints:
            assert instance_id(endpoint)[:46] in frame
        for stage in ("detect", "embed", "search"):
            assert stage in frame
        rows = {line.split()[0]: line.split() for line in frame.splitlines() if line.startswith("meshserve-")}
        assert rows["meshserve-embedder"][1] == "2/2" and rows["meshserve-indexer"][1] == "2/2"
        # Ctrl-C ending top with status 0 is test_top_cli's to prove; here only the picture matters
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            _wait_draining(proc, master, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)


def test_trace_prints_the_waterfall_of_a_search(mesh: Mesh) -> None:
    local, info = mesh
    photo = held_out_photos(local.config.home, 1)[0]
    reply = search_photo(info.gateway, photo.jpeg, top_k=5, timeout=30, min_score=0.01)
    assert len(reply.trace_id) == 32
    argv = [sys.executable, "-m", "meshserve.cli", "trace", reply.trace_id, "--trace-file", str(info.trace_file)]

    def printed() -> str:  # spans reach the file within the exporters' flush delay
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        return done.stdout if done.returncode == 0 and "meshserve-indexer" in done.stdout else ""

    out = wait_until(printed, timeout=30, interval=0.5, what=f"trace {reply.trace_id} in {info.trace_file}")
    assert out.startswith(f"trace {reply.trace_id}: ")
    for service in ("meshserve-gateway", "meshserve-detector", "meshserve-embedder", "meshserve-indexer"):
        assert f"{service}: " in out
    assert "█" in out
    unknown = subprocess.run([*argv[:4], "0" * 32, *argv[5:]], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "no span of trace" in unknown.stderr
    bad = subprocess.run([*argv[:4], "not-a-trace", *argv[5:]], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "32 hex digits" in bad.stderr


def start_server(local: LocalMesh, name: str, *args: str) -> Child:
    port_file = local.config.run_dir / "ports" / f"{name}.port"
    started = local.supervisor.start(ChildSpec(name, (*args, "--port", "0", "--port-file", str(port_file),
                                                      "--check-interval", "1", "--metrics-port", "0"),
                                               port_file=port_file))  # fmt: skip
    local.supervisor.wait_port(started, 120)
    return started


def test_a_killed_replica_leaves_the_targets_and_a_new_shard_joins_them(mesh: Mesh, served: int) -> None:
    from meshserve.training.catalogue import append_items
    from meshserve.training.shard_build import ItemSlice, build_from_catalogue

    local, info = mesh
    refresh_s, check_s = 2.0, 1.0
    victim = next(e for e in info.endpoints if e.name == "embedder-1")
    victim_id = instance_id(victim)
    assert any(t["labels"].get("instance_id") == victim_id for t in targets(info))
    killed_at = time.monotonic()
    victim.child.proc.send_signal(signal.SIGKILL)
    wait_until(lambda: all(t["labels"].get("instance_id") != victim_id for t in targets(info)), timeout=30,
               interval=0.2, what=f"{victim_id} gone from the targets")  # fmt: skip
    gone_after = time.monotonic() - killed_at

    new_items = append_items(5, local.config.home)
    fresh_dir = local.config.run_dir / "shards" / "fresh"
    build_from_catalogue(fresh_dir, ItemSlice("ids", new_items[0].item_id, new_items[-1].item_id + 1),
                         shard="fresh", home=local.config.home)  # fmt: skip
    started = start_server(local, "indexer-fresh", "serve", "indexer", "--shard", str(fresh_dir))
    fresh_id = f"meshserve-indexer-127.0.0.1-{started.port()}"
    passing_at = wait_until(lambda: registry_passing(local, fresh_id) and time.monotonic(), timeout=60,
                            interval=0.1, what=f"{fresh_id} passing")  # fmt: skip

    def fresh_up() -> dict[str, Any] | None:
        return next((t for t in targets(info) if t["labels"].get("instance_id") == fresh_id
                     and t["health"] == "up"), None)  # fmt: skip

    target = wait_until(fresh_up, timeout=30, interval=0.2, what=f"{fresh_id} an up target")
    joined_after = time.monotonic() - passing_at
    assert target["labels"]["shard"] == "fresh" and target["labels"]["service"] == "meshserve-indexer"
    assert query(info, f'up{{instance_id="{fresh_id}", shard="fresh"}} == 1')
    # within the refresh interval (plus a scrape, and the check that turns the killed one critical)
    bound = 4 * (refresh_s + check_s) + 5  # generous: a loaded 2-core machine
    assert gone_after <= bound and joined_after <= bound, (gone_after, joined_after)
    print(f"\nkilled replica left the targets {gone_after:.1f}s after SIGKILL; new shard an up target "
          f"{joined_after:.1f}s after it passed (refresh {refresh_s:.0f}s, check {check_s:.0f}s)")


def registry_passing(local: LocalMesh, service_id: str) -> bool:
    url = f"{local.registry_addr}/v1/health/service/meshserve-indexer?passing"
    with urllib.request.urlopen(url, timeout=2) as resp:
        return any(e["Service"]["ID"] == service_id for e in json.load(resp))
