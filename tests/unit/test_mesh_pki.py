"""The local mesh's certificates and how processes and commands find their TLS files."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve.local.mesh_pki import SERVICES, MeshPki
from meshserve.pki.inspect import describe_file
from meshserve.rpc.tls_files import ENV_CA, ENV_CERT, ENV_KEY, TlsFiles, TlsMaterialError, client_files


def test_secure_prepare_issues_every_service_and_commands_find_the_client_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (ENV_CA, ENV_CERT, ENV_KEY, "MESHSERVE_TLS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MESHSERVE_HOME", str(tmp_path))
    pki = MeshPki.prepare(tmp_path, secure=True)
    assert pki is not None
    for service in SERVICES:
        assert describe_file(pki.layout.cert(service)).uris == (f"spiffe://meshserve/service/{service}",)
    env = dict(pki.env("meshserve-detector"))
    assert env[ENV_CERT].endswith("certs/meshserve-detector.crt")
    assert pki.renew_due() == []  # fresh: nothing due
    assert "meshserve-gateway" in pki.renew_due(force=True)
    found = client_files()
    assert found is not None and found.cert == pki.layout.cert("cli")
    assert found.read().cert == pki.layout.cert("cli").read_bytes()
    monkeypatch.setenv("MESHSERVE_TLS", "off")
    assert client_files() is None
    monkeypatch.delenv("MESHSERVE_TLS")
    assert MeshPki.prepare(tmp_path, secure=False) is None  # `up --insecure`: commands speak plaintext to it
    assert client_files() is None
    assert MeshPki.prepare(tmp_path, secure=True) is not None
    assert client_files() is not None


def test_tls_files_need_all_three_and_a_key_that_fits(tmp_path: Path) -> None:
    assert TlsFiles.resolve(env={}) is None
    with pytest.raises(TlsMaterialError, match="missing --tls-key"):
        TlsFiles.resolve("ca.crt", "me.crt", env={})
    files = TlsFiles.resolve(env={ENV_CA: "a", ENV_CERT: "b", ENV_KEY: "c"})
    assert files == TlsFiles(Path("a"), Path("b"), Path("c"))
    with pytest.raises(TlsMaterialError, match="cannot read TLS file"):
        files.read()
    pki = MeshPki.prepare(tmp_path, secure=True)
    assert pki is not None
    layout = pki.layout
    mismatched = TlsFiles(layout.ca_cert, layout.cert("cli"), layout.key("meshserve-gateway"))
    with pytest.raises(TlsMaterialError, match="is not the key of"):
        mismatched.read()


def test_commands_reach_the_local_https_registry_with_the_mesh_ca_and_the_client_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshserve.registry.config import RegistryConfig

    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_SSL", "CONSUL_CACERT", "CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MESHSERVE_HOME", str(tmp_path))
    pki = MeshPki.prepare(tmp_path, secure=True, registry_host="10.1.2.3")
    assert pki is not None
    assert "10.1.2.3" in describe_file(pki.layout.cert("agent")).ips
    args = pki.https_registry_args("127.0.0.1:8500")
    assert args[:5] == ("--https-addr", "127.0.0.1:8500", "--http-addr", "off", "--verify-incoming")
    for given in (None, "127.0.0.1:8500", "http://127.0.0.1:8500"):  # no flag, or the local address by any scheme
        config = RegistryConfig.from_env(http_addr=given)
        assert config.http_addr == "https://127.0.0.1:8500"
        assert (config.ca_file, config.cert_file) == (str(pki.layout.ca_cert), str(pki.layout.cert("cli")))
        assert config.ssl_context() is not None
    assert RegistryConfig.from_env(http_addr="http://127.0.0.1:9500").ca_file is None  # another registry
    monkeypatch.setenv("CONSUL_HTTP_SSL", "false")  # an explicit choice wins
    assert RegistryConfig.from_env().http_addr == "http://127.0.0.1:8500"
    monkeypatch.delenv("CONSUL_HTTP_SSL")
    MeshPki.prepare(tmp_path, secure=False)  # `up --insecure`: plain HTTP again
    assert RegistryConfig.from_env().http_addr == "http://127.0.0.1:8500"
