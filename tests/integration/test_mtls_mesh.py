"""A whole mesh over mTLS with real processes: the gateway refuses callers without a valid mesh certificate, routes
only to replicas whose certificate names the service they registered as and to indexers with sound meta (`status`
says why the others are ignored), and keeps answering while every certificate is renewed under load."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from meshserve.gateway.client import SearchFailed, search_photo
from meshserve.local.demo import held_out_photos
from meshserve.local.mesh_pki import MeshPki
from meshserve.pki.authority import LeafSpec, client_leaf, init_ca, issue
from meshserve.pki.layout import PkiLayout, client_uri
from meshserve.rpc.https import client_context
from meshserve.rpc.tls_files import ENV_CA, ENV_CERT, ENV_KEY, TlsFiles
from tests.integration.mesh_parts import build_shard
from tests.integration.test_mtls import health_over, secure_channel, served_certificate
from tests.support import DevAgent, ManagedProcess, free_port, meshserve_argv, wait_until

GATEWAY = "meshserve-gateway"


@dataclass
class Proc:
    proc: ManagedProcess
    port: int
    metrics_port: int
    metrics_tls: ssl.SSLContext  # /metrics is HTTPS too, and wants a mesh client certificate

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str, labels: str = "") -> float:
        with urllib.request.urlopen(f"https://127.0.0.1:{self.metrics_port}/metrics", timeout=5,
                                    context=self.metrics_tls) as resp:  # fmt: skip
            text = resp.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and labels in line)  # fmt: skip


@dataclass
class SecureMesh:
    spawn: Callable[..., ManagedProcess]
    agent: DevAgent
    home: Path
    pki: MeshPki

    def env(self, cert_name: str) -> dict[str, str]:
        layout = self.pki.layout
        return {"MESHSERVE_HOME": str(self.home), "CONSUL_HTTP_ADDR": self.agent.http_addr,
                ENV_CA: str(layout.ca_cert), ENV_CERT: str(layout.cert(cert_name)),
                ENV_KEY: str(layout.key(cert_name))}  # fmt: skip

    def server(self, kind: str, cert_name: str, *extra: str) -> Proc:
        port, metrics = free_port(), free_port()
        argv = meshserve_argv("serve", kind, "--port", str(port), "--metrics-port", str(metrics), "--check-interval",
                              "1", "--threads", "1", *extra)  # fmt: skip
        return Proc(self.spawn(argv, name=kind, env=self.env(cert_name)), port, metrics, self.metrics_tls())

    def gateway(self) -> Proc:
        port, metrics = free_port(), free_port()
        argv = meshserve_argv("gateway", "--port", str(port), "--metrics-port", str(metrics), "--check-interval", "1",
                              "--cache-ttl", "0")  # every search goes through every stage
        return Proc(self.spawn(argv, name="gateway", env=self.env(GATEWAY)), port, metrics, self.metrics_tls())

    def metrics_tls(self) -> ssl.SSLContext:
        return client_context(TlsFiles.from_pki(self.pki.layout, "cli"))

    def register(self, body: dict) -> None:
        request = urllib.request.Request(f"{self.agent.http_addr}/v1/agent/service/register",
                                         data=json.dumps(body).encode(), method="PUT")  # fmt: skip
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200

    def passing(self, service: str) -> list[dict]:
        with urllib.request.urlopen(f"{self.agent.http_addr}/v1/health/service/{service}?passing", timeout=5) as r:
            return json.load(r)  # type: ignore[no-any-return]


@pytest.fixture
def client_tls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[PkiLayout, str], None]]:
    """Point this process's gRPC clients (search_photo & co.) at a certificate, as MESHSERVE_TLS_* do."""

    def use(layout: PkiLayout, name: str) -> None:
        monkeypatch.setenv(ENV_CA, str(layout.ca_cert))
        monkeypatch.setenv(ENV_CERT, str(layout.cert(name)))
        monkeypatch.setenv(ENV_KEY, str(layout.key(name)))

    yield use


@pytest.mark.timeout(900)
def test_mtls_mesh_routes_to_verified_replicas_only_and_survives_renewal_under_load(
    spawn: Callable[..., ManagedProcess], start_dev_agent: Callable[..., DevAgent], home_copy: Callable[[], Path],
    tmp_path: Path, client_tls: Callable[[PkiLayout, str], None],
) -> None:
    home = home_copy()
    shard = build_shard(home, tmp_path / "shard")
    photo = held_out_photos(home, 1)[0].jpeg
    pki = MeshPki.prepare(home, secure=True)
    assert pki is not None
    layout = pki.layout
    agent = start_dev_agent(pki.agent_args())
    mesh = SecureMesh(spawn, agent, home, pki)
    client_tls(layout, "cli")

    gateway = mesh.gateway()
    detector = mesh.server("detector", "meshserve-detector")
    mesh.server("embedder", "meshserve-embedder")
    indexer = mesh.server("indexer", "meshserve-indexer", "--shard", str(shard))
    # An impostor: a real server holding the embedder's certificate, registered as a detector of a newer version
    # (the newest is preferred) with a check that verifies the embedder's name, so the registry calls it passing.
    impostor = mesh.server("embedder", "meshserve-embedder", "--no-register")
    mesh.register({"Name": "meshserve-detector", "ID": "impostor-detector", "Address": "127.0.0.1",
                   "Port": impostor.port, "Meta": {"model": "detector", "version": "99999999", "role": "detector"},
                   "Check": {"GRPC": f"127.0.0.1:{impostor.port}", "GRPCUseTLS": True,
                             "TLSServerName": "meshserve-embedder", "Interval": "1s"}})  # fmt: skip
    # An indexer with meta that does not hold together (an empty shard), at the real indexer's address.
    mesh.register({"Name": "meshserve-indexer", "ID": "empty-indexer", "Address": "127.0.0.1", "Port": indexer.port,
                   "Meta": {"model": "indexer", "version": "1", "role": "indexer", "index": "catalogue",
                            "shard": "s-empty", "embedder_version": "x", "dim": "32", "count": "0", "metric": "ip"}})
    wait_until(lambda: len(mesh.passing("meshserve-detector")) == 2, timeout=300,
               what="the real detector and the impostor passing in the registry")  # fmt: skip

    def searched() -> object:
        gateway.proc.check_alive()
        try:
            return search_photo(gateway.target, photo, timeout=20, min_score=0.01)
        except SearchFailed:
            return None

    first = wait_until(searched, timeout=300, interval=0.5, what="a search through the mTLS mesh")
    assert first.coverage.shards_answered == first.coverage.shards_expected == 1  # type: ignore[attr-defined]
    for _ in range(5):
        search_photo(gateway.target, photo, timeout=20, min_score=0.01)
    assert detector.metric("meshserve_server_requests_total") > 0
    assert impostor.metric("meshserve_server_requests_total") == 0  # never called by the gateway
    rejected = 'meshserve_gateway_rejected_registrations{kind="identity",service="detector"}'
    assert gateway.metric(rejected) == 1
    assert gateway.metric('meshserve_gateway_rejected_registrations{kind="meta",service="indexer"}') == 1

    # `status` (with the local mesh's client certificate) says why each of them gets no traffic.
    status_env = {**os.environ, **mesh.env("cli")}
    done = subprocess.run(meshserve_argv("status", "--json"), capture_output=True, text=True, timeout=120,
                          env=status_env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    ignored = {r["id"]: r["ignored"] for rs in json.loads(done.stdout)["services"].values() for r in rs}
    assert "does not name meshserve-detector" in ignored["impostor-detector"], ignored
    assert "count=0" in ignored["empty-indexer"], ignored
    assert [why for rid, why in ignored.items() if rid not in ("impostor-detector", "empty-indexer")] == [""] * (
        len(ignored) - 2)

    # The gateway refuses callers without a valid mesh certificate.
    other = PkiLayout(tmp_path / "other-pki")
    init_ca(other)
    issue(other, client_leaf("cli"))
    issue(layout, LeafSpec("expired", uris=(client_uri("expired"),), hours=1, expired=True))
    ca = layout.ca_cert
    refused = {
        "plaintext": grpc.insecure_channel(gateway.target),
        "no client certificate": secure_channel(gateway.target, ca, None, None, GATEWAY),
        "another CA": secure_channel(gateway.target, ca, other.cert("cli"), other.key("cli"), GATEWAY),
        "expired": secure_channel(gateway.target, ca, layout.cert("expired"), layout.key("expired"), GATEWAY),
    }
    outcomes = {what: health_over(channel) for what, channel in refused.items()}
    assert outcomes == dict.fromkeys(refused, grpc.StatusCode.UNAVAILABLE), outcomes

    # Every certificate renewed three times while a search loop runs (a new connection per search).
    failures: list[str] = []
    done_searching = threading.Event()
    count = {"searches": 0}

    def search_loop() -> None:
        while not done_searching.is_set():
            try:
                search_photo(gateway.target, photo, timeout=20, min_score=0.01)
                count["searches"] += 1
            except SearchFailed as exc:
                failures.append(str(exc))

    loop = threading.Thread(target=search_loop)
    loop.start()
    try:
        for _ in range(3):
            time.sleep(1.0)
            renewed = pki.renew_due(force=True)
            assert "meshserve-gateway" in renewed and "cli" in renewed
        time.sleep(2.0)
    finally:
        done_searching.set()
        loop.join(timeout=60)
    print(f"{count['searches']} searches during renewal, {len(failures)} failed")
    assert failures == [] and count["searches"] >= 3
    # the gateway reopens its channels to the replicas with its renewed certificate, and searches go on
    wait_until(lambda: "reopened the channels" in gateway.proc.output(), timeout=60, what="channels reopened")
    search_photo(gateway.target, photo, timeout=20, min_score=0.01)
    newest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(layout.cert(GATEWAY).read_text())).hexdigest()
    assert served_certificate(gateway.port, layout, "cli") == newest
    wait_until(lambda: len(mesh.passing("meshserve-indexer")) == 2, timeout=30, what="checks still passing")
