"""The mesh CA: files and modes, identities in the SANs, chains that verify only against their own CA."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshserve.cli import main
from meshserve.pki.authority import LeafSpec, agent_leaf, client_leaf, init_ca, issue, needs_renewal, service_leaf
from meshserve.pki.inspect import describe_file, key_matches
from meshserve.pki.layout import PkiLayout, service_of


def _signed_by(cert_path: Path, ca_path: Path) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except InvalidSignature:
        return False
    return True


def test_ca_and_service_leaf_files_identity_and_modes(tmp_path: Path) -> None:
    layout = PkiLayout(tmp_path / "pki")
    assert init_ca(layout) is True
    ca_fingerprint = describe_file(layout.ca_cert).sha256
    assert init_ca(layout) is False and describe_file(layout.ca_cert).sha256 == ca_fingerprint  # kept
    issue(layout, service_leaf("meshserve-detector"))
    for key in (layout.ca_key, layout.key("meshserve-detector")):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    info = describe_file(layout.cert("meshserve-detector"))
    assert info.uris == ("spiffe://meshserve/service/meshserve-detector",)
    assert service_of(info.uris[0]) == "meshserve-detector"
    assert info.dns == ("meshserve-detector",) and not info.is_ca
    assert 23 * 3600 < info.expires_in_s() <= 24 * 3600
    assert _signed_by(layout.cert("meshserve-detector"), layout.ca_cert)
    assert key_matches(layout.cert("meshserve-detector").read_bytes(), layout.key("meshserve-detector").read_bytes())
    assert layout.leaf_names() == ["meshserve-detector"]


def test_agent_client_expired_and_foreign_ca(tmp_path: Path) -> None:
    mesh, other = PkiLayout(tmp_path / "mesh"), PkiLayout(tmp_path / "other")
    init_ca(mesh)
    init_ca(other)
    issue(mesh, agent_leaf())
    agent = describe_file(mesh.cert("agent"))
    assert agent.uris == ("spiffe://meshserve/agent/agent",) and "localhost" in agent.dns
    assert "127.0.0.1" in agent.ips
    issue(mesh, client_leaf())
    assert describe_file(mesh.cert("cli")).dns == ()
    issue(mesh, LeafSpec(name="old", uris=("spiffe://meshserve/service/meshserve-embedder",), hours=1, expired=True))
    assert describe_file(mesh.cert("old")).not_after < datetime.now(UTC)
    assert needs_renewal(mesh, "old") and not needs_renewal(mesh, "cli") and needs_renewal(mesh, "missing")
    issue(other, service_leaf("meshserve-detector"))
    assert not _signed_by(other.cert("meshserve-detector"), mesh.ca_cert)
    # a renewal replaces both files; the old key does not fit the new certificate
    old_key = mesh.key("agent").read_bytes()
    issue(mesh, agent_leaf())
    assert not key_matches(mesh.cert("agent").read_bytes(), old_key)


def test_bad_names_and_missing_ca_say_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="DNS label"):
        service_leaf("Meshserve_Detector")
    with pytest.raises(FileNotFoundError, match="certs init"):
        issue(PkiLayout(tmp_path / "none"), client_leaf())
    pki = str(tmp_path / "pki")
    assert main(["certs", "issue", "--pki", pki, "--client"]) == 2
    assert "certs init" in capsys.readouterr().err
    assert main(["certs", "init", "--pki", pki]) == 0
    assert main(["certs", "issue", "--pki", pki, "--service", "meshserve-indexer", "--ip", "10.0.0.7"]) == 0
    assert main(["certs", "issue", "--pki", pki, "--agent", "--ip", "not-an-ip"]) == 2
    assert main(["certs", "show", "--pki", pki]) == 0
    out = capsys.readouterr().out
    assert "spiffe://meshserve/service/meshserve-indexer" in out and "10.0.0.7" in out
