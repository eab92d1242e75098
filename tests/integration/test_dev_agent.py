"""The dev agent as a separate process, driven by the unmodified py-consul client: checks and health."""

from __future__ import annotations

import http.server
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consul
import pytest

from tests.conftest import DevAgent, module_dev_agent
from tests.support import ManagedProcess, free_port, wait_until

FAST_FLAGS = ["--min-check-interval", "100ms", "--reap-interval", "100ms",
              "--min-deregister-after", "0s"]
INTERVAL_S, TIMEOUT_S = 0.2, 0.5


agent = module_dev_agent(*FAST_FLAGS)


@pytest.fixture
def c(agent: DevAgent) -> consul.Consul:
    return agent.client()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def start_target(spawn: Callable[..., ManagedProcess], port: int | None = None,
                 *extra: str) -> tuple[ManagedProcess, int]:
    port = port or free_port()
    proc = spawn([sys.executable, "-m", "tests.health_target", "--port", str(port), *extra],
                 name="target")
    wait_until(lambda: (proc.check_alive(), "ready" in proc.output())[1], timeout=20,
               what="health target")
    return proc, port


def checks_of(c: consul.Consul, name: str) -> dict[str, dict[str, Any]]:
    _, entries = c.health.service(name)
    return {ch["CheckID"]: ch for e in entries for ch in e["Checks"]}


def wait_status(c: consul.Consul, name: str, check_id: str, status: str,
                timeout: float = 10.0) -> tuple[float, dict[str, Any]]:
    """Follow the service with blocking queries until `check_id` has `status`."""
    start = time.monotonic()
    index = None
    while time.monotonic() - start < timeout:
        index, entries = c.health.service(name, index=index, wait="1s")
        for entry in entries:
            for check in entry["Checks"]:
                if check["CheckID"] == check_id and check["Status"] == status:
                    return time.monotonic() - start, check
    raise AssertionError(f"{check_id} never became {status}: {checks_of(c, name).get(check_id)}")


class HttpTarget:
    """A tiny HTTP server in this process; answers GET with `code` and counts requests."""

    def __init__(self) -> None:
        self.code = 200
        self.count = 0
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                target.count += 1
                body = f"answer {target.code}".encode()
                self.send_response(target.code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_target() -> Iterator[HttpTarget]:
    target = HttpTarget()
    yield target
    target.close()


# ---- status, headers, checks -------------------------------------------------------------------


def test_leader_and_index_headers_even_on_404(agent: DevAgent, c: consul.Consul) -> None:
    import requests

    assert c.status.leader() == "127.0.0.1:8300"
    base = f"http://127.0.0.1:{agent.port}"
    for path in ("/v1/kv/no/such/key", "/v1/health/service/nothing-here", "/v1/catalog/services"):
        resp = requests.get(base + path, timeout=5)
        assert resp.status_code in (200, 404)
        assert int(resp.headers["X-Consul-Index"]) >= 1, path
        assert resp.headers["X-Consul-KnownLeader"] == "true"
        assert resp.headers["X-Consul-LastContact"] == "0"
    assert requests.get(base + "/v1/kv/no/such/key", timeout=5).status_code == 404
    index, value = c.kv.get("no/such/key")
    assert value is None and int(index) >= 1


def test_checks_start_critical_unless_status_is_given(c: consul.Consul) -> None:
    name = unique("starts")
    dead = f"127.0.0.1:{free_port()}"
    c.agent.service.register(name, service_id=name + "-ttl", check=consul.Check.ttl("30s"))
    c.agent.service.register(name, service_id=name + "-grpc",
                             check=consul.Check.grpc(dead, "200ms", timeout="200ms"))
    c.agent.service.register(name, service_id=name + "-given",
                             check={"TTL": "30s", "Status": "passing"})
    checks = checks_of(c, name)
    assert checks[f"service:{name}-ttl"]["Status"] == "critical"
    assert checks[f"service:{name}-grpc"]["Status"] == "critical"
    assert checks[f"service:{name}-given"]["Status"] == "passing"
    assert checks["serfHealth"]["Status"] == "passing"
    assert checks["serfHealth"]["ServiceID"] == ""
    _, passing = c.health.service(name, passing=True)
    assert [e["Service"]["ID"] for e in passing] == [name + "-given"]


def test_grpc_check_follows_its_target_down_and_up(c: consul.Consul, spawn) -> None:
    name = unique("grpc")
    target, port = start_target(spawn)
    meta = {"model": "m", "version": "3", "role": "embedder"}
    assert c.agent.service.register(
        name, service_id=name + "-1", address="127.0.0.1", port=port, tags=["v3"], meta=meta,
        check=consul.Check.grpc(f"127.0.0.1:{port}", "200ms", timeout="500ms", deregister="1m"))
    check_id = f"service:{name}-1"
    _, check = wait_status(c, name, check_id, "passing", timeout=5)
    assert check["Output"] == f"gRPC check 127.0.0.1:{port}: success"
    assert check["Type"] == "grpc"
    _, [entry] = c.health.service(name, passing=True)
    assert entry["Service"]["Meta"] == meta and entry["Service"]["Port"] == port
    assert entry["Service"]["Tags"] == ["v3"]

    target.kill()
    noticed, check = wait_status(c, name, check_id, "critical", timeout=10)
    assert noticed <= INTERVAL_S + TIMEOUT_S + 3.0, f"took {noticed:.2f}s to notice"  # slack: a loaded machine
    assert c.health.service(name, passing=True)[1] == []

    time.sleep(1.5)  # let the agent's channel back off to its longest reconnect delay
    start_target(spawn, port)
    elapsed, _ = wait_status(c, name, check_id, "passing", timeout=10)
    # the channel's reconnect backoff is capped at 1 s
    assert elapsed <= INTERVAL_S + TIMEOUT_S + 1.0 + 3.0, f"took {elapsed:.2f}s to recover"
    print(f"noticed the target going in {noticed:.2f}s, coming back in {elapsed:.2f}s")


def test_grpc_check_of_a_named_service_and_not_serving(c: consul.Consul, spawn) -> None:
    name = unique("grpcsvc")
    target, port = start_target(spawn, None, "--service", "embedder")
    c.agent.service.register(name, service_id=name + "-ok", check=consul.Check.grpc(
        f"127.0.0.1:{port}/embedder", "200ms", timeout="500ms"))
    c.agent.service.register(name, service_id=name + "-unknown", check=consul.Check.grpc(
        f"127.0.0.1:{port}/nope", "200ms", timeout="500ms"))
    wait_status(c, name, f"service:{name}-ok", "passing", timeout=5)
    unknown_id = f"service:{name}-unknown"
    wait_until(lambda: "NOT_FOUND" in checks_of(c, name)[unknown_id]["Output"], timeout=5,
               what="the probe of an unknown gRPC service")
    assert checks_of(c, name)[unknown_id]["Status"] == "critical"

    target.signal(signal.SIGUSR1)  # the target reports NOT_SERVING
    _, check = wait_status(c, name, f"service:{name}-ok", "critical", timeout=5)
    assert "NOT_SERVING" in check["Output"]
    target.signal(signal.SIGUSR1)
    wait_status(c, name, f"service:{name}-ok", "passing", timeout=5)


def test_ttl_pass_turns_passing_at_once_and_expiry_turns_critical(c: consul.Consul) -> None:
    name = unique("ttl")
    c.agent.service.register(name, service_id=name, check=consul.Check.ttl("600ms"))
    check_id = f"service:{name}"
    assert checks_of(c, name)[check_id]["Status"] == "critical"
    assert c.agent.check.ttl_pass(check_id, "all good")
    check = checks_of(c, name)[check_id]
    assert (check["Status"], check["Output"]) == ("passing", "all good")
    c.agent.check.ttl_warn(check_id, "hmm")
    assert checks_of(c, name)[check_id]["Status"] == "warning"
    c.agent.check.ttl_fail(check_id, "bad")
    assert checks_of(c, name)[check_id]["Status"] == "critical"
    c.agent.check.ttl_pass(check_id)
    elapsed, check = wait_status(c, name, check_id, "critical", timeout=5)
    assert check["Output"] == "TTL expired"
    assert 0.4 <= elapsed <= 6.0


def test_http_check_maps_2xx_429_and_5xx(c: consul.Consul, http_target: HttpTarget) -> None:
    name = unique("http")
    c.agent.service.register(name, service_id=name,
                             check=consul.Check.http(http_target.url, "100ms", timeout="1s"))
    check_id = f"service:{name}"
    _, check = wait_status(c, name, check_id, "passing")
    assert check["Output"].startswith(f"HTTP GET {http_target.url}: 200 OK Output: answer 200")
    http_target.code = 429
    wait_status(c, name, check_id, "warning")
    http_target.code = 503
    wait_status(c, name, check_id, "critical")
    http_target.code = 204
    wait_status(c, name, check_id, "passing")


def _statuses_until(c: consul.Consul, name: str, check_id: str, final: str,
                    timeout: float = 10.0) -> list[str]:
    """Every status the check shows on its way to `final` (blocking queries see each change)."""
    seen: list[str] = []
    index = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        index, entries = c.health.service(name, index=index, wait="1s")
        status = {ch["CheckID"]: ch["Status"] for e in entries for ch in e["Checks"]}[check_id]
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == final:
            return seen
    raise AssertionError(f"never reached {final}: {seen}")


def test_success_and_failure_thresholds(c: consul.Consul, http_target: HttpTarget) -> None:
    name = unique("thresholds")
    check = consul.Check.http(http_target.url, "100ms", timeout="1s")
    check.update(SuccessBeforePassing=3, FailuresBeforeWarning=1, FailuresBeforeCritical=3)
    c.agent.service.register(name, service_id=name, check=check)
    check_id = f"service:{name}"
    wait_status(c, name, check_id, "passing")  # like Consul, the first result applies at once

    http_target.code = 500
    before = http_target.count
    seen = _statuses_until(c, name, check_id, "critical")
    assert seen == ["passing", "warning", "critical"], seen
    assert http_target.count - before >= 3, "critical before 3 failures"

    http_target.code = 200
    before = http_target.count
    wait_status(c, name, check_id, "passing")
    assert http_target.count - before >= 3


def test_passing_filter_node_check_warning_and_maintenance(c: consul.Consul) -> None:
    name = unique("passing")
    for i in range(3):
        c.agent.service.register(name, service_id=f"{name}-{i}", check=consul.Check.ttl("60s"))
        c.agent.check.ttl_pass(f"service:{name}-{i}")

    def passing_ids() -> list[str]:
        return sorted(e["Service"]["ID"] for e in c.health.service(name, passing=True)[1])

    assert passing_ids() == [f"{name}-0", f"{name}-1", f"{name}-2"]
    _, entries = c.health.service(name)
    assert all(any(ch["CheckID"] == "serfHealth" for ch in e["Checks"]) for e in entries)

    c.agent.check.ttl_warn(f"service:{name}-0")
    assert passing_ids() == [f"{name}-1", f"{name}-2"]  # warning is not passing

    assert c.agent.service.maintenance(f"{name}-1", "true", "upgrading")
    maint = checks_of(c, name)[f"_service_maintenance:{name}-1"]
    assert (maint["Status"], maint["Notes"]) == ("critical", "upgrading")
    assert passing_ids() == [f"{name}-2"]
    c.agent.service.maintenance(f"{name}-1", "false")
    assert passing_ids() == [f"{name}-1", f"{name}-2"]

    index_before = int(c.health.service(name)[0])
    c.agent.maintenance("true", "node work")  # a node check fails every instance
    try:
        assert passing_ids() == []
        assert int(c.health.service(name)[0]) > index_before
    finally:
        c.agent.maintenance("false")
    assert passing_ids() == [f"{name}-1", f"{name}-2"]


def test_tag_and_filter_parameters(c: consul.Consul) -> None:
    name = unique("filter")
    c.agent.service.register(name, service_id=f"{name}-a", tags=["blue", "v1"],
                             meta={"shard": "1"}, check={"TTL": "60s", "Status": "passing"})
    c.agent.service.register(name, service_id=f"{name}-b", tags=["green"],
                             meta={"shard": "2"}, check={"TTL": "60s", "Status": "passing"})
    ids = lambda entries: sorted(e["Service"]["ID"] for e in entries)  # noqa: E731
    assert ids(c.health.service(name, tag="blue")[1]) == [f"{name}-a"]
    assert ids(c.health.service(name, tag=["blue", "v1"])[1]) == [f"{name}-a"]
    assert ids(c.health.service(name, tag=["blue", "green"])[1]) == []
    assert ids(c.health.service(name, filter_expr='Service.Meta.shard == "2"')[1]) == [f"{name}-b"]
    assert ids(c.health.service(name, filter_expr='"blue" in Service.Tags or '
                                                  'Service.Meta.shard == 2')[1]) == \
        [f"{name}-a", f"{name}-b"]
    with pytest.raises(consul.base.ConsulException, match="400"):
        c.health.service(name, filter_expr="Service.Meta.shard ===")
    # filters never change the index
    indexes = {c.health.service(name)[0], c.health.service(name, passing=True)[0],
               c.health.service(name, tag="green")[0],
               c.health.service(name, filter_expr='Service.Meta.shard == "2"')[0]}
    assert len(indexes) == 1


# ---- blocking queries and indexes ---------------------------------------------------------------


def test_blocking_query_returns_promptly_on_change(c: consul.Consul) -> None:
    name = unique("block")
    c.agent.service.register(name, service_id=name, check=consul.Check.ttl("60s"))
    index, _ = c.health.service(name)
    threading.Timer(0.3, lambda: c.agent.check.ttl_pass(f"service:{name}")).start()
    start = time.monotonic()
    new_index, entries = c.health.service(name, index=index, wait="10s")
    elapsed = time.monotonic() - start
    assert int(new_index) > int(index)
    assert entries[0]["Checks"][-1]["Status"] == "passing"
    assert 0.2 <= elapsed < 5.0, f"woke after {elapsed:.2f}s"  # on the change, not at the 10 s wait

    # the same for ?passing (filters do not change the index) and for a new service appearing
    other = unique("appears")
    index, entries = c.health.service(other, passing=True)
    assert entries == [] and int(index) >= 1
    threading.Timer(0.3, lambda: c.agent.service.register(other, check={"TTL": "9s"})).start()
    start = time.monotonic()
    new_index, _ = c.health.service(other, index=index, wait="10s", passing=True)
    assert int(new_index) > int(index) and time.monotonic() - start < 5.0


def test_blocking_query_times_out_with_the_same_index(c: consul.Consul) -> None:
    name = unique("timeout")
    c.agent.service.register(name, service_id=name, check=consul.Check.ttl("60s"))
    index, _ = c.health.service(name)
    start = time.monotonic()
    same, _ = c.health.service(name, index=index, wait="600ms")
    elapsed = time.monotonic() - start
    assert same == index
    assert 0.6 <= elapsed < 0.6 + 0.6 / 16 + 4.0, elapsed  # the wait asked, far from the 5 min default
    # index absent or 0 never blocks
    start = time.monotonic()
    c.health.service(name, index=0, wait="5s")
    assert time.monotonic() - start < 3.0


def test_index_is_never_zero_and_never_goes_backwards(c: consul.Consul) -> None:
    name = unique("mono")
    seen: list[int] = []

    def note() -> None:
        seen.append(int(c.health.service(name)[0]))
        seen.append(int(c.catalog.services()[0]))

    note()
    for i in range(5):
        c.agent.service.register(name, service_id=f"{name}-{i}", check=consul.Check.ttl("60s"))
        note()
        c.agent.check.ttl_pass(f"service:{name}-{i}")
        note()
    health_indexes = seen[0::2]
    assert min(seen) >= 1
    assert health_indexes == sorted(health_indexes) and len(set(health_indexes)) == 11
    for i in range(5):
        c.agent.service.deregister(f"{name}-{i}")
        note()
    assert seen[0::2] == sorted(seen[0::2]) and seen[1::2] == sorted(seen[1::2])


def test_deregister_removes_service_and_checks(c: consul.Consul) -> None:
    name = unique("dereg")
    c.agent.service.register(name, service_id=name, check=consul.Check.ttl("60s"))
    index, _ = c.health.service(name)
    assert name in c.agent.services() and f"service:{name}" in c.agent.checks()
    assert c.agent.service.deregister(name)
    assert name not in c.agent.services()
    assert f"service:{name}" not in c.agent.checks()
    new_index, entries = c.health.service(name)
    assert entries == [] and int(new_index) > int(index)
    assert name not in c.catalog.services()[1]
    # unknown IDs: Consul answers 404, which py-consul reports as False
    assert c.agent.service.deregister(name) is False


def test_deregister_critical_service_after_reaps(c: consul.Consul) -> None:
    name = unique("reap")
    dead = f"127.0.0.1:{free_port()}"
    c.agent.service.register(name, service_id=name,
                             check=consul.Check.grpc(dead, "100ms", timeout="200ms",
                                                     deregister="500ms"))
    c.agent.service.register(name, service_id=name + "-kept", check=consul.Check.ttl("60s"))
    assert name in c.agent.services()
    start = time.monotonic()
    wait_until(lambda: name not in c.agent.services(), timeout=10, what="reaping")
    assert 0.4 <= time.monotonic() - start <= 5.0
    assert name + "-kept" in c.agent.services()  # critical, but without a deregister timeout


def test_catalog_services_and_service(c: consul.Consul) -> None:
    name = unique("catalog")
    c.agent.service.register(name, service_id=f"{name}-1", address="10.0.0.1", port=50051,
                             tags=["a", "b"], meta={"model": "m"}, check=consul.Check.ttl("60s"))
    c.agent.service.register(name, service_id=f"{name}-2", tags=["b", "c"])
    _, services = c.catalog.services()
    assert sorted(services[name]) == ["a", "b", "c"]
    _, entries = c.catalog.service(name)
    by_id = {e["ServiceID"]: e for e in entries}
    assert by_id[f"{name}-1"]["ServiceAddress"] == "10.0.0.1"
    assert by_id[f"{name}-1"]["ServicePort"] == 50051
    assert by_id[f"{name}-1"]["ServiceMeta"] == {"model": "m"}
    assert by_id[f"{name}-1"]["Address"] == "127.0.0.1"
    assert [e["ServiceID"] for e in c.catalog.service(name, tag="a")[1]] == [f"{name}-1"]


def test_agent_services_and_checks_maps(c: consul.Consul) -> None:
    name = unique("agentmaps")
    c.agent.service.register(name, service_id=name, port=7, check=consul.Check.ttl("60s"),
                             extra_checks=[consul.Check.ttl("60s")])
    services = c.agent.services()
    assert services[name]["Service"] == name and services[name]["Port"] == 7
    checks = c.agent.checks()
    # two checks → Consul numbers them service:<id>:1, service:<id>:2
    assert {f"service:{name}:1", f"service:{name}:2"} <= set(checks)
    assert checks[f"service:{name}:1"]["ServiceName"] == name
    assert c.agent.service_definition(name)["ID"] == name


def test_grpc_check_over_tls(c: consul.Consul, spawn, tmp_path: Path) -> None:
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    _, port = start_target(spawn, None, "--tls-cert", str(cert), "--tls-key", str(key))
    name = unique("tls")
    target = f"127.0.0.1:{port}"
    c.agent.service.register(name, service_id=name + "-skip", check=consul.Check.grpc(
        target, "200ms", use_tls=True, tls_skip_verify=True, timeout="1s"))
    c.agent.service.register(name, service_id=name + "-verify", check=consul.Check.grpc(
        target, "200ms", use_tls=True, timeout="1s"))
    c.agent.service.register(name, service_id=name + "-plain", check=consul.Check.grpc(
        target, "200ms", timeout="1s"))
    _, check = wait_status(c, name, f"service:{name}-skip", "passing", timeout=10)
    assert check["Definition"]["GRPCUseTLS"] is True
    for suffix in ("-verify", "-plain"):  # an unknown CA, and plaintext against TLS, both fail
        wait_until(lambda s=suffix: checks_of(c, name)[f"service:{name}{s}"]["Output"], timeout=10,
                   what=f"probe of {suffix}")
        assert checks_of(c, name)[f"service:{name}{suffix}"]["Status"] == "critical"


def test_intervals_below_the_minimum_are_raised_like_consul(c: consul.Consul) -> None:
    name = unique("floor")
    c.agent.service.register(name, check=consul.Check.grpc("127.0.0.1:1", "10ms"))
    check = c.agent.checks()[f"service:{name}"]
    assert check["Interval"] == "100ms"  # this agent runs with --min-check-interval 100ms
