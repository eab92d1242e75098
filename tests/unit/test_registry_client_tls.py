"""The registry client's certificate for an HTTPS agent with verify_incoming: a renewed one is presented on the
next connection, without reopening the client."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import threading
from pathlib import Path

from meshserve.local.mesh_pki import MeshPki
from meshserve.pki.authority import client_leaf, issue
from meshserve.registry.config import RegistryConfig
from meshserve.registry.consul_http import open_consul


def _agent(pki: MeshPki, seen: list[str]) -> int:
    """A stand-in HTTPS agent on loopback: records each client's certificate, answers /v1/status/leader, closes."""
    layout = pki.layout
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(layout.ca_cert))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(layout.cert("agent"), layout.key("agent"))
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            raw, _ = listener.accept()
            with context.wrap_socket(raw, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                seen.append(hashlib.sha256(der or b"").hexdigest())
                tls.recv(65536)
                tls.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 1\r\n'
                            b'Connection: close\r\nContent-Length: 16\r\n\r\n"127.0.0.1:8300"')  # fmt: skip

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


def test_a_renewed_client_certificate_is_presented_on_the_next_connection(tmp_path: Path) -> None:
    pki = MeshPki.prepare(tmp_path, secure=True)
    assert pki is not None
    layout, seen = pki.layout, []
    port = _agent(pki, seen)
    config = RegistryConfig(http_addr=f"https://127.0.0.1:{port}", ca_file=str(layout.ca_cert),
                            cert_file=str(layout.cert("cli")), key_file=str(layout.key("cli")))  # fmt: skip

    def fingerprint() -> str:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(layout.cert("cli").read_text())).hexdigest()

    async def twice() -> None:
        client = open_consul(config)
        try:
            assert await client.status.leader() == "127.0.0.1:8300"
            first = fingerprint()
            issue(layout, client_leaf("cli"))
            assert fingerprint() != first
            await client.status.leader()
        finally:
            await client.close()

    before = fingerprint()
    asyncio.run(twice())
    assert seen == [before, fingerprint()]
