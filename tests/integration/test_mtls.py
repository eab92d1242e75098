"""Mutual TLS with real processes: a model server refuses callers without a valid mesh certificate (on its gRPC,
OIP REST and /metrics ports), the dev agent checks it over TLS with its own certificate, and a renewed certificate
is served without a restart."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.pki.authority import LeafSpec, agent_leaf, client_leaf, init_ca, issue, service_leaf
from meshserve.pki.layout import PkiLayout, client_uri
from meshserve.rpc.tls_files import ENV_CA, ENV_CERT, ENV_KEY
from tests.integration.identity_server import predict_request, stub
from tests.support import DevAgent, ManagedProcess, free_port, meshserve_argv, wait_until

IDENTITY = "meshserve-identity"


def tls_env(layout: PkiLayout, name: str) -> dict[str, str]:
    return {ENV_CA: str(layout.ca_cert), ENV_CERT: str(layout.cert(name)), ENV_KEY: str(layout.key(name))}


def start_identity_tls(spawn: Callable[..., ManagedProcess], agent: DevAgent, layout: PkiLayout,
                       *extra: str) -> tuple[ManagedProcess, int]:  # fmt: skip
    """`serve identity` with the mesh CA's meshserve-identity certificate, registered in `agent`."""
    port = free_port()
    argv = meshserve_argv("serve", "identity", "--port", str(port), "--consul", agent.http_addr, "--check-interval",
                          "0.5", *extra)  # fmt: skip
    return spawn(argv, name="identity", env=tls_env(layout, IDENTITY)), port


def secure_channel(target: str, ca: Path, cert: Path | None, key: Path | None, server_name: str) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                               cert.read_bytes() if cert else None)  # fmt: skip
    return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", server_name)])


def health_over(channel: grpc.Channel) -> grpc.StatusCode:
    """OK when the server answered a health call over this channel, else the status code of the failure."""
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    finally:
        channel.close()
    return grpc.StatusCode.OK


def served_certificate(port: int, layout: PkiLayout, client: str) -> str:
    """SHA-256 of the certificate the server presents on a new connection (handshake with a client cert)."""
    context = ssl.create_default_context(cafile=str(layout.ca_cert))
    context.check_hostname = False
    context.load_cert_chain(str(layout.cert(client)), str(layout.key(client)))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def https_get(url: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> int | str:
    """The HTTP status of GET `url` with this client certificate (none: no certificate), or why it failed."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False  # the server's certificate names its service, not 127.0.0.1
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    try:
        with urllib.request.urlopen(url, timeout=5, context=context if url.startswith("https") else None) as resp:
            return int(resp.status)
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__


def check_meta(agent: DevAgent, service: str) -> dict[str, str]:
    with urllib.request.urlopen(f"{agent.http_addr}/v1/catalog/service/{service}", timeout=5) as resp:
        (entry,) = json.load(resp)
    return entry["ServiceMeta"]  # type: ignore[no-any-return]


def check_of(agent: DevAgent, service: str) -> dict:
    with urllib.request.urlopen(f"{agent.http_addr}/v1/health/checks/{service}", timeout=5) as resp:
        checks = json.load(resp)
    return checks[0] if checks else {}


@pytest.fixture
def mesh_pki(tmp_path: Path) -> PkiLayout:
    layout = PkiLayout(tmp_path / "pki")
    init_ca(layout)
    for spec in (service_leaf(IDENTITY), client_leaf("cli"), agent_leaf("agent"),
                 LeafSpec("expired", uris=(client_uri("expired"),), hours=1, expired=True)):  # fmt: skip
        issue(layout, spec)
    return layout


def test_a_model_server_serves_mesh_clients_only_and_the_agent_checks_it_over_mtls(
    spawn: Callable[..., ManagedProcess], start_dev_agent: Callable[..., DevAgent], mesh_pki: PkiLayout,
    tmp_path: Path,
) -> None:
    layout = mesh_pki
    other = PkiLayout(tmp_path / "other-pki")
    init_ca(other)
    issue(other, client_leaf("cli"))
    agent = start_dev_agent(["--ca-file", str(layout.ca_cert), "--cert-file", str(layout.cert("agent")),
                             "--key-file", str(layout.key("agent"))])  # fmt: skip
    rest_port, metrics_port = free_port(), free_port()
    server, port = start_identity_tls(spawn, agent, layout, "--http-port", str(rest_port), "--metrics-port",
                                      str(metrics_port))  # fmt: skip
    target = f"127.0.0.1:{port}"

    # The registry's gRPC check speaks TLS, verifies the service's name and presents the agent's certificate.
    def check_passing() -> bool:
        server.check_alive()
        return check_of(agent, IDENTITY).get("Status") == "passing"

    wait_until(check_passing, timeout=60, what="the identity server's TLS check passing")

    def call(channel: grpc.Channel) -> grpc.StatusCode:
        return health_over(channel)

    ca, cli_cert, cli_key = layout.ca_cert, layout.cert("cli"), layout.key("cli")
    assert call(secure_channel(target, ca, cli_cert, cli_key, IDENTITY)) == grpc.StatusCode.OK
    with secure_channel(target, ca, cli_cert, cli_key, IDENTITY) as channel:
        reply = stub(channel).Predict(predict_request(np.ones((2, 3), np.float32)), timeout=10)
        assert reply.model_name
    refused = {
        "plaintext": grpc.insecure_channel(target),
        "no client certificate": secure_channel(target, ca, None, None, IDENTITY),
        "a certificate from another CA": secure_channel(target, ca, other.cert("cli"), other.key("cli"), IDENTITY),
        "an expired certificate": secure_channel(target, ca, layout.cert("expired"), layout.key("expired"),
                                                 IDENTITY),  # fmt: skip
        "expecting another service": secure_channel(target, ca, cli_cert, cli_key, "meshserve-detector"),
    }
    outcomes = {what: call(channel) for what, channel in refused.items()}
    assert outcomes == dict.fromkeys(refused, grpc.StatusCode.UNAVAILABLE), outcomes

    # The OIP REST port and /metrics speak HTTPS with the same certificate and want a mesh client certificate.
    meta = check_meta(agent, IDENTITY)
    assert (meta["http_scheme"], meta["metrics_scheme"]) == ("https", "https"), meta
    for url in (f"127.0.0.1:{rest_port}/v2/health/ready", f"127.0.0.1:{metrics_port}/metrics"):
        assert https_get(f"https://{url}", ca, cli_cert, cli_key) == 200, url
        http_refused = {
            "plaintext": https_get(f"http://{url}", ca),
            "no client certificate": https_get(f"https://{url}", ca),
            "a certificate from another CA": https_get(f"https://{url}", ca, other.cert("cli"), other.key("cli")),
            "an expired certificate": https_get(f"https://{url}", ca, layout.cert("expired"), layout.key("expired")),
        }
        assert all(isinstance(outcome, str) for outcome in http_refused.values()), (url, http_refused)

    # Renewal: the server presents the new certificate from the next handshake on, no restart.
    kept = secure_channel(target, ca, cli_cert, cli_key, IDENTITY)
    assert health_over_kept(kept)
    before = served_certificate(port, layout, "cli")
    issue(layout, service_leaf(IDENTITY))
    renewed = hashlib.sha256(ssl.PEM_cert_to_DER_cert(layout.cert(IDENTITY).read_text())).hexdigest()
    assert renewed != before
    wait_until(lambda: served_certificate(port, layout, "cli") == renewed, timeout=10,
               what="the renewed certificate served")  # fmt: skip
    assert health_over_kept(kept)  # a connection made before the renewal keeps working
    kept.close()
    assert call(secure_channel(target, ca, cli_cert, cli_key, IDENTITY)) == grpc.StatusCode.OK
    assert check_of(agent, IDENTITY).get("Status") == "passing"
    server.check_alive()


def health_over_kept(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING  # type: ignore[no-any-return]


def test_an_agent_without_a_client_certificate_sees_the_mtls_server_critical(
    spawn: Callable[..., ManagedProcess], start_dev_agent: Callable[..., DevAgent], mesh_pki: PkiLayout,
) -> None:
    agent = start_dev_agent(["--ca-file", str(mesh_pki.ca_cert)])
    server, port = start_identity_tls(spawn, agent, mesh_pki)

    target = f"127.0.0.1:{port}"

    def serving() -> bool:
        server.check_alive()
        channel = secure_channel(target, mesh_pki.ca_cert, mesh_pki.cert("cli"), mesh_pki.key("cli"), IDENTITY)
        return health_over(channel) == grpc.StatusCode.OK

    wait_until(serving, timeout=60, what="the identity server serving mesh clients")
    # the server is up and answers mesh clients; the agent, presenting no certificate, is refused by it

    def checked_while_listening() -> dict:
        check = check_of(agent, IDENTITY)
        output = check.get("Output", "")
        return check if output and "refused" not in output.lower() else {}

    check = wait_until(checked_while_listening, timeout=30, what="a check result from the listening server")
    assert check["Status"] == "critical" and "UNAVAILABLE" in check["Output"], check
