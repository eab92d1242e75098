"""The dev agent over HTTPS with verify_incoming: who is refused, and clients configured by Consul's env vars."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import consul
import pytest
import requests

from meshserve.pki.authority import LeafSpec, agent_leaf, client_leaf, init_ca, issue
from meshserve.pki.layout import PkiLayout, agent_uri
from meshserve.registry.client import RegistryClient
from meshserve.registry.config import RegistryConfig
from meshserve.registry.consul_http import RegistryUnavailable
from tests.conftest import DevAgent
from tests.integration.test_dev_agent import FAST_FLAGS
from tests.support import ManagedProcess, free_port, meshserve_argv, wait_until

ROOT = "root-secret"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    other_ca_client: tuple[Path, Path]
    expired_client: tuple[Path, Path]
    named_server: tuple[Path, Path]  # names only registry.meshserve, not 127.0.0.1


def _pair(layout: PkiLayout, spec: LeafSpec) -> tuple[Path, Path]:
    issue(layout, spec)
    return layout.cert(spec.name), layout.key(spec.name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    mesh, other = PkiLayout(tmp_path_factory.mktemp("pki")), PkiLayout(tmp_path_factory.mktemp("other-pki"))
    init_ca(mesh)
    init_ca(other)
    return Pki(ca=mesh.ca_cert, server=_pair(mesh, agent_leaf("agent")), client=_pair(mesh, client_leaf("cli")),
               other_ca_client=_pair(other, client_leaf("cli")),
               expired_client=_pair(mesh, LeafSpec("old-cli", uris=("spiffe://meshserve/client/old",), expired=True)),
               named_server=_pair(mesh, LeafSpec("registry", uris=(agent_uri("registry"),),
                                                 dns=("registry.meshserve",))))  # fmt: skip


def _client_context(pki: Pki, cert: tuple[Path, Path] | None, server_name_check: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.check_hostname = server_name_check
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def start_https_agent(spawn: Callable[..., ManagedProcess], pki: Pki, server: tuple[Path, Path]) -> int:
    port = free_port()
    proc = spawn(meshserve_argv("registry", "dev", "--http-addr", "off", "--https-addr", f"127.0.0.1:{port}",
                                "--acl-token", ROOT,
                                "--ca-file", str(pki.ca), "--cert-file", str(server[0]), "--key-file", str(server[1]),
                                "--verify-incoming", *FAST_FLAGS), name="dev-agent-https")  # fmt: skip
    context = _client_context(pki, pki.client, server_name_check=False)

    def leader_answers() -> bool:
        proc.check_alive()
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/v1/status/leader", timeout=1, context=context) as r:
            return r.status == 200

    wait_until(leader_answers, timeout=20, what="the HTTPS dev agent")
    return port


@pytest.fixture(scope="module")
def https_port(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    from tests.support import Spawner

    spawner = Spawner(tmp_path_factory.mktemp("https-agent"))
    try:
        yield start_https_agent(spawner, pki, pki.server)
    finally:
        spawner.stop_all()


def test_clients_without_a_good_certificate_are_refused(pki: Pki, https_port: int) -> None:
    url = f"https://127.0.0.1:{https_port}/v1/catalog/services"
    ok = requests.get(url, verify=str(pki.ca), cert=tuple(map(str, pki.client)), timeout=5,
                      headers={"X-Consul-Token": ROOT})
    assert ok.status_code == 200 and "consul" in ok.json()
    for cert in (None, pki.other_ca_client, pki.expired_client):
        with pytest.raises(requests.exceptions.ConnectionError):  # (SSLError is one)
            requests.get(url, verify=str(pki.ca), cert=tuple(map(str, cert)) if cert else None, timeout=5)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{https_port}/v1/status/leader", timeout=5)  # plain HTTP: no answer


def test_py_consul_and_the_mesh_client_over_https_from_consul_env(
    pki: Pki, https_port: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # py-consul as is: https from CONSUL_HTTP_ADDR, CA and client pair as its verify/cert arguments
    monkeypatch.setenv("CONSUL_HTTP_ADDR", f"https://127.0.0.1:{https_port}")
    plain = consul.Consul(token=ROOT, verify=str(pki.ca), cert=tuple(map(str, pki.client)))
    assert plain.kv.put("meshserve/config/tls", "yes") is True
    assert plain.kv.get("meshserve/config/tls")[1]["Value"] == b"yes"

    # the mesh's clients: every TLS setting from Consul's variables
    monkeypatch.setenv("CONSUL_HTTP_ADDR", f"127.0.0.1:{https_port}")
    monkeypatch.setenv("CONSUL_HTTP_SSL", "true")
    monkeypatch.setenv("CONSUL_CACERT", str(pki.ca))
    monkeypatch.setenv("CONSUL_CLIENT_CERT", str(pki.client[0]))
    monkeypatch.setenv("CONSUL_CLIENT_KEY", str(pki.client[1]))
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", ROOT)
    config = RegistryConfig.from_env()
    assert config.http_addr == f"https://127.0.0.1:{https_port}"

    async def round_trip() -> str | None:
        async with RegistryClient(config) as client:
            await client.kv_put("meshserve/rollout/tls", "1")
            return await client.kv_get("meshserve/config/tls")

    assert asyncio.run(round_trip()) == "yes"

    # ... and another process of the CLI, with nothing but the environment
    done = subprocess.run(meshserve_argv("acl", "token", "list"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Initial Management Token" in done.stdout

    monkeypatch.delenv("CONSUL_CLIENT_CERT")
    monkeypatch.delenv("CONSUL_CLIENT_KEY")

    async def without_cert() -> None:
        async with RegistryClient(RegistryConfig.from_env()) as client:
            await client.kv_get("meshserve/config/tls")

    with pytest.raises(RegistryUnavailable, match="unreachable"):
        asyncio.run(without_cert())


def test_tls_server_name_checks_a_certificate_issued_for_another_name(
    pki: Pki, spawn: Callable[..., ManagedProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = start_https_agent(spawn, pki, pki.named_server)
    for name, value in (("CONSUL_HTTP_ADDR", f"https://127.0.0.1:{port}"), ("CONSUL_CACERT", str(pki.ca)),
                        ("CONSUL_CLIENT_CERT", str(pki.client[0])), ("CONSUL_CLIENT_KEY", str(pki.client[1])),
                        ("CONSUL_HTTP_TOKEN", ROOT)):  # fmt: skip
        monkeypatch.setenv(name, value)

    async def leader() -> str:
        async with RegistryClient(RegistryConfig.from_env()) as client:
            return str(await client.call("leader", client.consul.status.leader()))

    with pytest.raises(RegistryUnavailable, match="unreachable"):  # 127.0.0.1 is not a name in its certificate
        asyncio.run(leader())
    monkeypatch.setenv("CONSUL_TLS_SERVER_NAME", "registry.meshserve")
    assert asyncio.run(leader()) == "127.0.0.1:8300"


def test_certificate_files_alone_keep_plain_http(
    pki: Pki, start_dev_agent: Callable[..., DevAgent], spawn: Callable[..., ManagedProcess]
) -> None:
    """The files are also the agent's identity for TLS gRPC checks: HTTPS only where --https-addr says."""
    agent = start_dev_agent(["--ca-file", str(pki.ca), "--cert-file", str(pki.server[0]),
                             "--key-file", str(pki.server[1]), *FAST_FLAGS])  # fmt: skip
    assert agent.client().status.leader() == "127.0.0.1:8300"
    for flags, message in ((["--https-addr", f"127.0.0.1:{free_port()}"], "needs --cert-file and --key-file"),
                           (["--verify-incoming"], "give --https-addr"),
                           (["--http-addr", "off"], "nothing to listen on")):  # fmt: skip
        bad = spawn(meshserve_argv("registry", "dev", *flags), name="bad-tls-flags")
        assert bad.wait(20) != 0 and message in bad.output(), bad.output()
