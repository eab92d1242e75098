"""`meshserve up` and `meshserve demo` as real processes over the tiny trained home: `status` sees every
service passing, a SIGKILLed replica turns critical within seconds and is restarted, and nothing they started
outlives them — after Ctrl-C, after the demo ends, and when `up` itself is SIGKILLed."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import ManagedProcess, descendants, free_port, meshserve_argv, wait_until

SMALL_MESH = ("--detectors", "1", "--embedders", "1", "--shards", "2", "--nats-addr", "none")
UP_TIMEOUT_S = 300  # eight servers importing torch at once on a shared 2-core box
STOP_TIMEOUT_S = 120
# A test may bring `up` up (its fixture), wait up to 180 s for a restart, and stop it: pytest's own
# limit stays above the sum of those waits.
pytestmark = pytest.mark.timeout(UP_TIMEOUT_S + 180 + STOP_TIMEOUT_S + 300)


# -- processes and ports, read from /proc and the loopback ------------------------------------


def running_meshserve(pid: int) -> bool:
    """A live (not zombie) meshserve process with this pid — a reused pid of something else does not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state != "Z" and b"meshserve" in cmdline


def survivors(pids: set[int]) -> set[int]:
    return {pid for pid in pids if running_meshserve(pid)}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def kill_leftovers(pids: set[int]) -> None:
    """Safety net after a failed test: no process of ours may outlive the module."""
    for pid in survivors(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- a `meshserve up` process and what it prints ----------------------------------------------


@dataclass(frozen=True)
class Row:
    role: str
    name: str
    port: int
    pid: int


class Up:
    """`meshserve up` on free ports over a private home; knows every process it started."""

    def __init__(self, home: Path, log_dir: Path, *flags: str):
        self.registry_port, self.gateway_port = free_port(), free_port()
        self.registry = f"https://127.0.0.1:{self.registry_port}"  # secure by default: HTTPS only
        self.home = home
        argv = meshserve_argv("up", "--registry-addr", f"127.0.0.1:{self.registry_port}",
                              "--gateway-addr", f"127.0.0.1:{self.gateway_port}", *flags)  # fmt: skip
        self.proc = ManagedProcess(argv, log_dir / "up.log", env={"MESHSERVE_HOME": str(home)})
        self.seen: set[int] = set()  # every descendant ever observed
        self.extra_ports: set[int] = set()  # ports of servers started after the table was printed

    def tls(self) -> dict[str, str]:
        """Consul's client variables for the mesh's registry: its CA and the command-line certificate."""
        pki = self.home / "pki"
        return {"CONSUL_CACERT": str(pki / "ca.crt"), "CONSUL_CLIENT_CERT": str(pki / "certs" / "cli.crt"),
                "CONSUL_CLIENT_KEY": str(pki / "certs" / "cli.key")}  # fmt: skip

    def ssl_context(self, client_certificate: bool = True) -> ssl.SSLContext:
        tls = self.tls()
        context = ssl.create_default_context(cafile=tls["CONSUL_CACERT"])
        if client_certificate:
            context.load_cert_chain(tls["CONSUL_CLIENT_CERT"], tls["CONSUL_CLIENT_KEY"])
        return context

    def consul(self, token: str) -> Any:
        import consul

        tls = self.tls()
        return consul.Consul(host="127.0.0.1", port=self.registry_port, scheme="https", token=token,
                             verify=tls["CONSUL_CACERT"], cert=(tls["CONSUL_CLIENT_CERT"], tls["CONSUL_CLIENT_KEY"]))

    def observe(self) -> set[int]:
        now = descendants(self.proc.pid)
        self.seen |= now
        return now

    def wait_up(self) -> list[Row]:
        def printed_table() -> bool:
            self.observe()
            self.proc.check_alive()
            return "Ctrl-C stops everything" in self.proc.output()

        wait_until(printed_table, timeout=UP_TIMEOUT_S, interval=0.2, what="`meshserve up` to print its table")
        return self.rows()

    def wait_servers_spawned(self) -> set[int]:
        """Wait until `up` has started the registry and every model server (they are still loading)."""

        def spawned() -> bool:
            self.proc.check_alive()
            planned = re.search(r"starting (\d+) model servers", self.proc.output())
            return planned is not None and len(self.observe()) >= int(planned[1]) + 1  # + the registry

        wait_until(spawned, timeout=UP_TIMEOUT_S, interval=0.1, what="`up` to start its model servers")
        return self.observe()

    def rows(self) -> list[Row]:
        table = self.proc.output().split("meshserve is up:", 1)[1]
        rows = [Row(m[1], m[3], int(m[2]), int(m[4]))
                for m in re.finditer(r"^(\w+)\s+127\.0\.0\.1:(\d+)\s+(\S+)\s+pid (\d+)", table, re.M)]  # fmt: skip
        registry = re.search(r"^registry\s+\S+\s+pid (\d+)", table, re.M)
        assert registry, table
        rows.append(Row("registry", "registry", self.registry_port, int(registry[1])))
        return rows

    def stop(self) -> None:
        self.observe()
        try:
            self.proc.stop(grace=STOP_TIMEOUT_S)
        finally:
            kill_leftovers(self.seen)


def meshserve_status(registry: str, home: Path, tls: dict[str, str] | None = None) -> dict:
    """`meshserve status` in another process of the same MESHSERVE_HOME: it finds the mesh's token and TLS files
    there (or is given the TLS files, `tls`, from elsewhere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_HTTP_TOKEN", "CONSUL_C"))}
    done = subprocess.run([*meshserve_argv("status", "--json", "--consul", registry)], capture_output=True,
                          text=True, timeout=120, env={**env, **(tls or {}), "MESHSERVE_HOME": str(home)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def status_of(status: dict, role: str, port: int) -> str | None:
    for replica in status["services"][role]:
        if replica["target"] == f"127.0.0.1:{port}":
            return str(replica["status"])
    return None


def registry_check_status(up: Up, service: str, port: int) -> str | None:
    """The aggregated check status of one instance, straight from the registry's HTTPS API (with the
    mesh's operator token: ACLs are on)."""
    token = (up.home / "acl" / "operator.token").read_text().strip()
    request = urllib.request.Request(f"{up.registry}/v1/health/service/{service}", headers={"X-Consul-Token": token})
    with urllib.request.urlopen(request, timeout=2, context=up.ssl_context()) as resp:
        entries = json.load(resp)
    for entry in entries:
        if entry["Service"]["Port"] == port:
            statuses = {check["Status"] for check in entry["Checks"]}
            for worst in ("critical", "warning", "passing"):
                if worst in statuses:
                    return worst
    return None


# -- one `up` for status, a killed replica, its restart and Ctrl-C ------------------------------


@pytest.fixture(scope="module")
def shared_up(home_copy: Callable[[], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Up]]:
    """The module's `up`, shared while it runs; every one started here is stopped at the end."""
    started: list[Up] = []
    try:
        yield started
    finally:
        for mesh in started:
            mesh.stop()


@pytest.fixture
def up(shared_up: list[Up], home_copy: Callable[[], Path], tmp_path_factory: pytest.TempPathFactory) -> Up:
    """A running `up`: the shared one, or a new one when a test before this one ended it (Ctrl-C), so
    no test depends on running before or after another."""
    if shared_up and shared_up[-1].proc.alive():
        return shared_up[-1]
    mesh = Up(home_copy(), tmp_path_factory.mktemp("up"), *SMALL_MESH)
    shared_up.append(mesh)
    started = time.monotonic()
    mesh.wait_up()
    print(f"`meshserve up` printed its table after {time.monotonic() - started:.0f}s")
    return mesh


def test_status_in_another_process_shows_every_service_passing(up: Up) -> None:
    rows = [r for r in up.rows() if r.role != "registry"]
    assert {r.role for r in rows} == {"detector", "embedder", "classifier", "shipping", "indexer", "gateway"}
    assert sum(r.role == "indexer" for r in rows) == 2
    status = meshserve_status(up.registry, up.home)
    # (a replica killed by another test stays registered, critical, until the registry reaps it; its
    # replacement is not in the table: judge the live rows, and every role by its passing replicas)
    for row in rows:
        if running_meshserve(row.pid):
            assert status_of(status, row.role, row.port) == "passing", (row, status["services"][row.role])
    for role in {r.role for r in rows}:
        assert any(r["status"] == "passing" for r in status["services"][role]), (role, status["services"][role])
    assert [s["coverage"] for s in status["shard_sets"]] == [1.0]


def test_acls_are_on_and_each_workload_may_do_only_its_own_job(up: Up, tmp_path: Path) -> None:
    import consul

    acl = up.home / "acl"
    assert acl.stat().st_mode & 0o777 == 0o700
    tokens = {p.stem: p.read_text().strip() for p in acl.glob("*.token")}
    assert {"bootstrap", "detector", "indexer", "gateway", "operator", "reader"} <= set(tokens)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in acl.glob("*.token"))
    detector = up.consul(tokens["detector"])
    with pytest.raises(consul.ACLPermissionDenied, match="lacks permission 'service:write' on \"meshserve-indexer\""):
        detector.agent.service.register("meshserve-indexer", service_id="impostor", port=1)
    with pytest.raises(consul.ACLPermissionDenied, match="lacks permission 'key:write' on \"meshserve/config/"):
        detector.kv.put("meshserve/config/photo_search", "{}")
    anonymous = urllib.request.urlopen(f"{up.registry}/v1/catalog/services", timeout=5, context=up.ssl_context())
    with anonymous as resp:
        assert json.load(resp) == {} and resp.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    unknown = urllib.request.Request(f"{up.registry}/v1/catalog/services", headers={"X-Consul-Token": "nope"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(unknown, timeout=5, context=up.ssl_context())
    assert refused.value.code == 403 and refused.value.read() == b"ACL not found"
    # the gateway's token reads replicas but registers nothing but the gateway
    gateway = up.consul(tokens["gateway"])
    assert gateway.health.service("meshserve-detector", passing=True)[1]
    with pytest.raises(consul.ACLPermissionDenied):
        gateway.agent.service.register("meshserve-detector", service_id="impostor", port=1)
    # `status` without the mesh's token: says the answers were filtered, not that nothing runs
    elsewhere = meshserve_status(up.registry, tmp_path, up.tls())
    assert all(not replicas for replicas in elsewhere["services"].values())
    assert "hidden by registry ACLs" in elsewhere["acl"]["detector"]


def test_registry_answers_only_https_clients_holding_a_mesh_certificate(up: Up) -> None:
    leader = f"127.0.0.1:{up.registry_port}/v1/status/leader"
    with urllib.request.urlopen(f"https://{leader}", timeout=5, context=up.ssl_context()) as resp:
        assert resp.status == 200  # the mesh CA's certificate of the command line
    with pytest.raises((OSError, http.client.HTTPException)):  # no plain HTTP port: this one speaks only TLS
        urllib.request.urlopen(f"http://{leader}", timeout=5)
    with pytest.raises(OSError):  # TLS without a client certificate: refused in the handshake
        urllib.request.urlopen(f"https://{leader}", timeout=5, context=up.ssl_context(client_certificate=False))


def test_top_finds_the_https_registry_and_reads_every_replicas_metrics_over_mtls_without_flags(up: Up) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "MESHSERVE_TLS"))}
    done = subprocess.run(meshserve_argv("top", "--once", "--consul", f"127.0.0.1:{up.registry_port}"),
                          capture_output=True, text=True, timeout=120, env={**env, "MESHSERVE_HOME": str(up.home)})
    assert done.returncode == 0, done.stderr
    assert f"registry https://127.0.0.1:{up.registry_port}" in done.stdout
    rows = [line.split() for line in done.stdout.splitlines() if re.match(r"meshserve-\S+-127\.0\.0\.1-\d+ ", line)]
    passing = [row for row in rows if "passing" in row]
    assert len(passing) >= 7 and all(row[-1] == "ok" for row in passing), done.stdout  # scraped over HTTPS


def test_sigkilled_replica_turns_critical_within_a_few_check_intervals_then_restarted(up: Up) -> None:
    detector = next(r for r in up.rows() if r.name == "detector-0")
    up.observe()
    os.kill(detector.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: registry_check_status(up, "meshserve-detector", detector.port) == "critical",
               timeout=10, interval=0.05, what="the killed detector to turn critical")  # fmt: skip
    to_critical = time.monotonic() - killed
    status = meshserve_status(up.registry, up.home)
    status_done = time.monotonic() - killed
    print(f"killed detector critical in the registry after {to_critical:.2f}s; "
          f"`meshserve status` (a new process) showed it after {status_done:.2f}s")  # fmt: skip
    assert to_critical <= 6.0  # check every 1 s with a 1 s timeout: ~2-3 s, with slack for a loaded machine
    assert status_of(status, "detector", detector.port) == "critical"

    # `up` notices, says so, and starts a new detector that registers and passes.
    restarted = wait_until(lambda: re.search(r"detector-0 restarted \(pid (\d+)\)", up.proc.output()),
                           timeout=30, what="`up` to restart detector-0")  # fmt: skip
    assert restarted is not None
    new_pid = int(restarted[1])
    assert new_pid in up.observe() and running_meshserve(new_pid)

    def new_detector_passing() -> list[int]:
        up.proc.check_alive()
        found = meshserve_status(up.registry, up.home)["services"]["detector"]
        return [int(r["target"].rsplit(":", 1)[1]) for r in found
                if r["status"] == "passing" and r["target"] != f"127.0.0.1:{detector.port}"]  # fmt: skip

    ports = wait_until(new_detector_passing, timeout=180, interval=0.5, what="the restarted detector to pass")
    assert "exited with -9" in up.proc.output()
    up.extra_ports.update(ports)  # the Ctrl-C test checks these close too


def test_ctrl_c_exits_0_and_nothing_it_started_survives(up: Up) -> None:
    rows = up.rows()
    ports = {r.port for r in rows} | up.extra_ports
    started = up.observe() | {r.pid for r in rows}
    assert len(started) >= len(rows)
    up.proc.signal(signal.SIGINT)
    interrupted = time.monotonic()
    assert up.proc.wait(timeout=STOP_TIMEOUT_S) == 0, up.proc.output()[-3000:]
    print(f"`meshserve up` exited {time.monotonic() - interrupted:.0f}s after SIGINT")
    assert survivors(started | up.seen) == set()
    assert [p for p in sorted(ports) if listening(p)] == []
    output = up.proc.output()
    assert output.rstrip().endswith("stopped") and "Traceback" not in output


# -- `up` stopped during bring-up, or killed --------------------------------------------------


@pytest.fixture
def loading_up(home_copy: Callable[[], Path], tmp_path: Path) -> Iterator[Up]:
    """A one-shard `up` whose registry and model servers have all been started, none ready yet."""
    mesh = Up(home_copy(), tmp_path, "--detectors", "1", "--embedders", "1", "--shards", "1", "--nats-addr", "none")
    try:
        assert len(mesh.wait_servers_spawned()) >= 8
        yield mesh
    finally:
        mesh.stop()


def test_sigterm_during_bring_up_stops_everything_without_finishing_it(loading_up: Up) -> None:
    started = loading_up.observe()
    loading_up.proc.signal(signal.SIGTERM)
    assert loading_up.proc.wait(timeout=STOP_TIMEOUT_S) == 0
    output = loading_up.proc.output()
    # (tiny models may finish loading between the spawn being seen and the signal, so the table
    # may or may not have been printed; either way nothing may outlive `up`)
    assert output.rstrip().endswith("stopped"), output[-2000:]
    assert survivors(started | loading_up.seen) == set()
    assert not listening(loading_up.registry_port) and not listening(loading_up.gateway_port)


def test_sigkill_of_up_takes_every_child_with_it(home_copy: Callable[[], Path], tmp_path: Path) -> None:
    """Killed once the whole mesh is up: every child gets the parent-death signal, stops, and exits
    promptly (they used to spend minutes in the interpreter's teardown, orphaned)."""
    mesh = Up(home_copy(), tmp_path, "--detectors", "1", "--embedders", "1", "--shards", "1", "--nats-addr", "none")
    try:
        rows = mesh.wait_up()
        started = mesh.observe() | {r.pid for r in rows}
        assert len(started) >= 9
        mesh.proc.kill()
        killed = time.monotonic()
        wait_until(lambda: not survivors(started), timeout=STOP_TIMEOUT_S, interval=0.1,
                   what=f"the children of the killed `up` to exit: {survivors(started)}")  # fmt: skip
        print(f"every child of the SIGKILLed `up` exited within {time.monotonic() - killed:.1f}s")
        assert [r.port for r in rows if listening(r.port)] == []
    finally:
        mesh.stop()


# -- demo ----------------------------------------------------------------------------------------


def test_demo_searches_draws_prints_the_waterfall_and_leaves_nothing(
    home_copy: Callable[[], Path], tmp_path: Path
) -> None:
    home, out = home_copy(), tmp_path / "out.png"
    registry_port, gateway_port = free_port(), free_port()
    argv = meshserve_argv("demo", "--queries", "2", "-o", str(out), "--min-score", "0.01", *SMALL_MESH,
                          "--registry-addr", f"127.0.0.1:{registry_port}",
                          "--gateway-addr", f"127.0.0.1:{gateway_port}",
                          "--nats-addr", f"127.0.0.1:{free_port()}", "--workers", "1")  # fmt: skip (NATS too)
    demo = ManagedProcess(argv, tmp_path / "demo.log", env={"MESHSERVE_HOME": str(home)})
    seen: set[int] = set()
    try:
        def finished() -> bool:
            seen.update(descendants(demo.pid))
            return not demo.alive()

        started = time.monotonic()
        wait_until(finished, timeout=UP_TIMEOUT_S + STOP_TIMEOUT_S, interval=0.2, what="`meshserve demo` to end")
        print(f"demo took {time.monotonic() - started:.0f}s")
        output = demo.output()
        assert demo.proc.returncode == 0, output[-3000:]
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert re.search(r"coverage 2/2", output), output
        waterfall = output.split("(one search, every stage and shard):", 1)[1]
        for stage in ("validate", "detect", "embed", "search", "merge", "enrich"):
            assert re.search(rf"meshserve-gateway: {stage}\b", waterfall), (stage, waterfall)
        assert re.search(r"meshserve-gateway: shard base-\d", waterfall), waterfall
        for server in ("detector", "embedder", "indexer"):
            assert f"meshserve-{server}: meshserve.v1.PredictionService/Predict" in waterfall, (server, waterfall)
        # Listing checks: one allowed listing, then the same with a classifier stopped → partial.
        checks = output.split("listing checks (meshserve guard check)", 1)[1]
        assert re.search(r"allowed: .*\n\s+→ ALLOW ", checks), checks
        assert re.search(r"with a classifier stopped: .*\n\s+→ \w+  \(partial\)", checks), checks
        assert re.search(r"\s(counterfeit|prohibited|contact_info)\s+unavailable", checks), checks
        assert len(seen) >= 9  # registry + 8 servers + gateway were seen running
        assert survivors(seen) == set()
        assert not listening(registry_port) and not listening(gateway_port)
    finally:
        demo.stop()
        kill_leftovers(seen)


def test_the_test_helpers_see_a_real_process_tree(tmp_path: Path) -> None:
    """descendants() and running_meshserve() are what the tests above rely on: check them on a tree."""
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"  # noqa: E501
    parent = ManagedProcess([sys.executable, "-c", script, "meshserve"], tmp_path / "tree.log")
    try:
        below = wait_until(lambda: descendants(parent.pid), timeout=20, what="the grandchild")
        assert len(below) == 1 and parent.pid not in below
        assert running_meshserve(parent.pid)  # "meshserve" is in its argv
        assert not running_meshserve(next(iter(below)))  # no "meshserve" in the grandchild's argv
    finally:
        parent.stop()
    assert not running_meshserve(parent.pid)
