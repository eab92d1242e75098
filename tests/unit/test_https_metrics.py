"""/metrics over HTTPS with the mesh's certificates: a mesh client certificate is required, renewals are served."""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from meshserve.local.mesh_pki import MeshPki
from meshserve.pki.authority import init_ca, issue, service_leaf
from meshserve.pki.inspect import describe_pem
from meshserve.pki.layout import PkiLayout
from meshserve.rpc.https import client_context, serve_metrics
from meshserve.rpc.tls_files import TlsFiles


def test_metrics_over_https_refuse_clients_without_a_mesh_certificate_and_serve_a_renewal(tmp_path: Path) -> None:
    pki = MeshPki.prepare(tmp_path, secure=True)
    assert pki is not None
    layout = pki.layout
    registry = CollectorRegistry()
    Counter("probe_total", "a probe", registry=registry).inc()
    server = TlsFiles.from_pki(layout, "meshserve-detector")
    port = serve_metrics(0, "127.0.0.1", registry, server)
    url = f"https://127.0.0.1:{port}/metrics"

    cli = client_context(TlsFiles.from_pki(layout, "cli"))
    with urllib.request.urlopen(url, timeout=5, context=cli) as resp:
        assert "probe_total 1.0" in resp.read().decode()
    anonymous = ssl.create_default_context(cafile=layout.ca_cert)
    anonymous.check_hostname = False
    with pytest.raises(OSError):  # TLS, but no client certificate
        urllib.request.urlopen(url, timeout=5, context=anonymous).read()
    other = PkiLayout(tmp_path / "other")
    init_ca(other)
    issue(other, service_leaf("meshserve-detector"))
    stranger = ssl.create_default_context(cafile=layout.ca_cert)
    stranger.check_hostname = False
    stranger.load_cert_chain(other.cert("meshserve-detector"), other.key("meshserve-detector"))
    with pytest.raises(OSError):  # a certificate of another CA
        urllib.request.urlopen(url, timeout=5, context=stranger).read()
    with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()

    before = _served_fingerprint(port, cli)
    issue(layout, service_leaf("meshserve-detector"))
    assert _served_fingerprint(port, cli) != before  # the renewed certificate, no restart


def _served_fingerprint(port: int, context: ssl.SSLContext) -> str:
    """The fingerprint of the certificate the server presents to a new connection."""
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
    return describe_pem(ssl.DER_cert_to_PEM_cert(der).encode()).sha256
