"""The mesh across four hosts (network namespaces, tests/hosts.py) under search load, hurt the way a
network hurts it: a host's cable pulled, the registry host cut off, the registry hung, a replica hung.

Hosts: `registry` (the dev agent), `a` and `b` (a detector, an embedder and a replica of the one
shard each), `gw` (two gateways over the same mesh: one hedging detector, embedder and shard calls, one
not).
Every server advertises its host's address. Each test starts from the whole mesh passing, prints
its figures (failed searches, time to route around, time to recover) and undoes its fault however
it ends. Skipped, with the reason, where network namespaces cannot be made (not root).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hosts import Hosts, sweep_stale, unavailable_reason
from tests.integration.load import SearchLoad
from tests.support import ManagedProcess, Spawner, meshserve_argv, wait_until

pytestmark = pytest.mark.timeout(600)

MIN_SCORE = 0.01  # tiny models are unsure of everything; low enough that every photo has detections
HEDGE_MS = 150.0
# Ports inside a fresh namespace are all free: nothing else lives there.
REGISTRY_PORT, HEDGED_PORT, PLAIN_PORT, HEDGED_METRICS, PLAIN_METRICS = 8500, 50050, 50060, 9100, 9101
STAGES = ("detector", "embedder", "indexer")
REGISTRY_OUTAGE_S = 60.0  # the figure: a minute without the registry
FIGURES: list[str] = []  # one table row per fault, printed at the end of the module


@dataclass
class Net:
    hosts: Hosts
    registry: ManagedProcess
    registry_url: str
    servers: dict[str, ManagedProcess]  # "a/embedder" → process
    hedged: str  # gateway targets
    plain: str
    hedged_metrics: str
    plain_metrics: str
    photos: list[bytes]
    env: dict[str, str]


def _shard(home: Path, root: Path) -> Path:
    from meshserve.inference.artifacts import latest
    from meshserve.training.catalogue import load_items
    from meshserve.training.shard_build import ItemSlice, build_from_catalogue

    ids = [item.item_id for item in load_items(home)]
    shard_dir = root / "base-0"
    build_from_catalogue(shard_dir, ItemSlice("ids", ids[0], ids[-1] + 1), embedder=str(latest("embedder", home)),
                         shard="base-0", home=home)  # fmt: skip
    return shard_dir


@pytest.fixture(scope="module")
def net(home_copy: Callable[[], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from meshserve.local.demo import held_out_photos

    home = home_copy()
    run_dir = tmp_path_factory.mktemp("hosts")
    shard_dir = _shard(home, run_dir / "shards")
    spawner = Spawner(run_dir)
    with Hosts(["registry", "a", "b", "gw"]) as hosts:
        try:
            registry_url = f"http://{hosts['registry'].address}:{REGISTRY_PORT}"
            env = {"MESHSERVE_HOME": str(home), "CONSUL_HTTP_ADDR": registry_url}
            registry = spawner(hosts["registry"].argv(meshserve_argv(
                "registry", "dev", "--http-addr", f"{hosts['registry'].address}:{REGISTRY_PORT}",
                "--data-dir", str(run_dir / "registry"))), name="registry", env=env)  # fmt: skip
            wait_until(lambda: registry.check_alive() or _get(f"{registry_url}/v1/status/leader"), timeout=30,
                       what="the dev registry")  # fmt: skip
            servers = {}
            for name in ("a", "b"):
                host = hosts[name]
                for kind, extra in (("detector", ()), ("embedder", ()), ("indexer", ("--shard", str(shard_dir)))):
                    servers[f"{name}/{kind}"] = spawner(host.argv(meshserve_argv(
                        "serve", kind, *extra, "--host", host.address, "--port", "0", "--threads", "1",
                        "--check-interval", "1")), name=f"{name}-{kind}", env=env)  # fmt: skip
            gw = hosts["gw"]
            hedged = ("--hedge-ms", str(HEDGE_MS), "--hedge-shards-ms", str(HEDGE_MS))
            for port, metrics, hedge in ((HEDGED_PORT, HEDGED_METRICS, hedged),
                                         (PLAIN_PORT, PLAIN_METRICS, ())):  # fmt: skip
                spawner(gw.argv(meshserve_argv(
                    "gateway", "--host", gw.address, "--port", str(port), "--metrics-port", str(metrics),
                    "--check-interval", "1", *hedge)), name=f"gateway-{port}", env=env)  # fmt: skip
            found = Net(hosts, registry, registry_url, servers, f"{gw.address}:{HEDGED_PORT}",
                        f"{gw.address}:{PLAIN_PORT}", f"http://{gw.address}:{HEDGED_METRICS}/metrics",
                        f"http://{gw.address}:{PLAIN_METRICS}/metrics", [], env)  # fmt: skip
            found.photos = [p.jpeg for p in held_out_photos(home, 8)]

            def whole() -> bool:
                for proc in spawner.started:
                    proc.check_alive()
                return mesh_whole(found)

            wait_until(whole, timeout=300, interval=0.5, what="every replica passing and both gateways routing")
            yield found
        finally:
            for proc in spawner.started:  # a stopped process would not see its SIGTERM
                _signal_group(proc, signal.SIGCONT)
            spawner.stop_all()
    if FIGURES:
        print("\n\nfault → failed searches → time to route around → time to recover")
        print("\n".join(FIGURES))


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def _signal_group(proc: ManagedProcess, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def metric(url: str, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    text = _get(url).decode()
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def replica_statuses(net: Net) -> dict[str, str]:
    """Every registered replica of the model stages → its worst check status, from the registry."""
    from meshserve.registry.config import SERVICE_NAMES

    found = {}
    for stage in STAGES:
        for entry in json.loads(_get(f"{net.registry_url}/v1/health/service/{SERVICE_NAMES[stage]}")):
            statuses = {c["Status"] for c in entry["Checks"]}
            worst = next((s for s in ("critical", "warning") if s in statuses), "passing")
            found[f"{entry['Service']['Address']}/{stage}"] = worst
    return found


def routes(url: str) -> tuple[int, ...]:
    """A gateway's passing replicas per stage, and whether it says its routes are stale."""
    return (*(int(metric(url, "meshserve_gateway_replicas", f'stage="{s}"')) for s in STAGES),
            int(metric(url, "meshserve_gateway_registry_stale")))  # fmt: skip


def mesh_whole(net: Net) -> bool:
    """All six replicas passing in the registry, and both gateways routing over all of them, fresh."""
    statuses = replica_statuses(net)
    return (len(statuses) == 6 and set(statuses.values()) == {"passing"}
            and routes(net.hedged_metrics) == routes(net.plain_metrics) == (2, 2, 2, 0))  # fmt: skip


def status_cli(net: Net) -> dict[str, str]:
    """`meshserve status --json` run on the gateway host: replica target → status."""
    done = subprocess.run(net.hosts["gw"].argv(meshserve_argv("status", "--json", "--consul", net.registry_url)),
                          capture_output=True, text=True, timeout=60, env={**os.environ, **net.env})  # fmt: skip
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    return {r["target"]: r["status"] for stage in STAGES for r in services[stage]}


def started_since(load: SearchLoad, since: float, n: int) -> Callable[[], bool]:
    return lambda: sum(1 for o in load.outcomes if o.started >= since) >= n


@pytest.fixture
def whole_net(net: Net) -> Net:
    """The mesh as a test expects to find it, whatever ran before."""
    wait_until(lambda: mesh_whole(net), timeout=90, interval=0.5, what="the whole mesh passing and routed")
    return net


def record(fault: str, failed: int, total: int, around: float | None, recover: float) -> None:
    around_text = f"{around:5.1f} s" if around is not None else "   -   "
    FIGURES.append(f"{fault:<38} {failed:>3} of {total:<4} {around_text}   {recover:5.1f} s")
    print(f"\n{FIGURES[-1]}")


def test_what_a_dead_run_left_is_swept() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    dead = 4_194_304 + 1  # above pid_max's ceiling: no process ever has it
    netns, link = f"meshserve-test-{dead}-1-x", f"mst{dead}abr"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "link", "add", link, "type", "bridge"], check=True)
    try:
        assert {netns, link} <= set(sweep_stale())
        assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert subprocess.run(["ip", "link", "show", link], capture_output=True).returncode != 0
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", link], capture_output=True)


def test_status_shows_what_each_gateway_hedges(whole_net: Net) -> None:
    argv = whole_net.hosts["gw"].argv
    env = {**os.environ, **whole_net.env}
    done = subprocess.run(argv(meshserve_argv("status", "--json", "--consul", whole_net.registry_url)),
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    hedges = {int(r["target"].rsplit(":", 1)[1]): (r["meta"].get("hedge_ms"), r["meta"].get("hedge_shards_ms"))
              for r in json.loads(done.stdout)["services"]["gateway"]}  # fmt: skip
    assert hedges == {HEDGED_PORT: (f"{HEDGE_MS:g}", f"{HEDGE_MS:g}"), PLAIN_PORT: (None, None)}
    text = subprocess.run(argv(meshserve_argv("status", "--consul", whole_net.registry_url)),
                          capture_output=True, text=True, timeout=60, env=env).stdout  # fmt: skip
    assert f"hedges: detector/embedder after {HEDGE_MS:g} ms, shard calls after {HEDGE_MS:g} ms" in text, text
    assert "hedges: detector/embedder off, shard calls off" in text, text


# -- a host's cable pulled ------------------------------------------------------------------------


def test_a_host_cut_off_is_routed_around_shown_critical_and_back_when_mended(whole_net: Net) -> None:
    net = whole_net
    host = net.hosts["a"]
    with SearchLoad(net.hedged, net.photos, rate=6, min_score=MIN_SCORE) as load:
        wait_until(started_since(load, 0, 10), timeout=60, what="the load running")
        cut_at = time.monotonic()
        host.cut()
        try:
            wait_until(lambda: routes(net.hedged_metrics)[:3] == (1, 1, 1), timeout=30, interval=0.1,
                       what="the gateway routing around the cut host")  # fmt: skip
            around = time.monotonic() - cut_at
            statuses = status_cli(net)
            cut_targets = {t: s for t, s in statuses.items() if t.startswith(f"{host.address}:")}
            assert len(cut_targets) == 3 and set(cut_targets.values()) == {"critical"}, statuses
            wait_until(started_since(load, time.monotonic(), 12), timeout=60, what="searches while cut off")
        finally:
            mended_at = time.monotonic()
            host.mend()
        wait_until(lambda: mesh_whole(net), timeout=60, interval=0.1, what="the host's replicas back")
        recover = time.monotonic() - mended_at
        assert set(status_cli(net).values()) == {"passing"}
        wait_until(started_since(load, time.monotonic(), 12), timeout=60, what="searches after mending")
    failures = load.failures()
    record("host a's link down (hedged gateway)", len(failures), len(load.outcomes), around, recover)
    # A call in flight to the cut host when its link went down waits for an answer that never comes:
    # every stage's, shard calls too (tests/unit/test_shard_fanout.py), is hedged to host b after
    # 150 ms. So no search may fail, not even one started just before the cut.
    assert failures == [], failures[:3]


# -- the registry away: cut off, or hung ----------------------------------------------------------


def _registry_away(net: Net, fault: str, leave: Callable[[], None], come_back: Callable[[], None]) -> None:
    with SearchLoad(net.hedged, net.photos, rate=6, min_score=MIN_SCORE) as load:
        wait_until(started_since(load, 0, 10), timeout=60, what="the load running")
        away_at = time.monotonic()
        leave()
        try:
            wait_until(lambda: routes(net.hedged_metrics)[3] == 1, timeout=30, interval=0.1,
                       what="the gateway saying its routes are stale")  # fmt: skip
            noticed = time.monotonic() - away_at
            assert routes(net.hedged_metrics)[:3] == (2, 2, 2)  # still routing on the last known set
            wait_until(lambda: time.monotonic() - away_at >= REGISTRY_OUTAGE_S, timeout=REGISTRY_OUTAGE_S + 5,
                       interval=0.2)  # fmt: skip
        finally:
            back_at = time.monotonic()
            come_back()
        wait_until(lambda: mesh_whole(net), timeout=60, interval=0.1, what="fresh routes again")
        recover = time.monotonic() - back_at
        wait_until(started_since(load, time.monotonic(), 12), timeout=60, what="searches after")
    failures = load.failures()
    record(fault, len(failures), len(load.outcomes), noticed, recover)
    while_away = [f for f in failures if f.started < back_at]
    assert while_away == [], while_away[:3]
    assert failures == [], failures[:3]


# The dev agent runs every replica's health check itself, from its own host: cut off, it sees the
# whole mesh critical and answers the gateway's first read after the outage with no passing replica
# until its checks pass again. The route table holds such an answer for a few seconds
# (gateway/outage_hold.py SETTLE_AFTER_OUTAGE_S), so no search may fail on the way back either.
def test_registry_host_cut_off_keeps_routing_says_stale_and_reconciles(whole_net: Net) -> None:
    host = whole_net.hosts["registry"]
    _registry_away(whole_net, f"registry host cut off {REGISTRY_OUTAGE_S:.0f} s", host.cut, host.mend)


def test_hung_registry_keeps_routing_says_stale_and_reconciles(whole_net: Net) -> None:
    registry = whole_net.registry
    _registry_away(whole_net, f"registry SIGSTOPped {REGISTRY_OUTAGE_S:.0f} s",
                   lambda: _signal_group(registry, signal.SIGSTOP), lambda: _signal_group(registry, signal.SIGCONT))


# -- a replica that accepts connections and never answers -----------------------------------------


def test_hung_replica_is_routed_around_and_hedging_shows_in_the_p99(whole_net: Net) -> None:
    net = whole_net
    embedder = net.servers["a/embedder"]
    with SearchLoad(net.hedged, net.photos, rate=4, min_score=MIN_SCORE) as hedged, \
            SearchLoad(net.plain, net.photos, rate=4, min_score=MIN_SCORE) as plain:  # fmt: skip
        wait_until(lambda: started_since(hedged, 0, 20)() and started_since(plain, 0, 20)(), timeout=60)
        stopped_at = time.monotonic()
        _signal_group(embedder, signal.SIGSTOP)
        try:
            wait_until(lambda: routes(net.hedged_metrics)[1] == routes(net.plain_metrics)[1] == 1, timeout=30,
                       interval=0.1, what="both gateways routing around the hung embedder")  # fmt: skip
            around = time.monotonic() - stopped_at
            wait_until(started_since(hedged, time.monotonic(), 12), timeout=60, what="searches around it")
        finally:
            continued_at = time.monotonic()
            _signal_group(embedder, signal.SIGCONT)
        wait_until(lambda: mesh_whole(net), timeout=60, interval=0.1, what="the embedder back")
        recover = time.monotonic() - continued_at
    window = (stopped_at, continued_at)
    hedged_failures, plain_failures = hedged.failures(), plain.failures()
    print(f"\nhung embedder: p99 before {hedged.p99_ms(until=stopped_at):.0f} ms (hedged gateway) / "
          f"{plain.p99_ms(until=stopped_at):.0f} ms (plain); while hung {hedged.p99_ms(*window):.0f} ms hedged, "
          f"{plain.p99_ms(*window):.0f} ms plain; failed {len(hedged_failures)} hedged, {len(plain_failures)} plain "
          f"({sorted({f.code.name for f in plain_failures})})")
    record("embedder on a SIGSTOPped (hedged)", len(hedged_failures), len(hedged.outcomes), around, recover)
    record("embedder on a SIGSTOPped (no hedging)", len(plain_failures), len(plain.outcomes), around, recover)
    assert hedged_failures == [], hedged_failures[:3]
