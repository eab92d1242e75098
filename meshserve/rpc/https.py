"""HTTPS with the mesh's certificates on a process's HTTP ports (/metrics, OIP REST), and its clients' side.

A process that speaks mTLS on gRPC serves its HTTP ports the same way: its own certificate, a client
certificate from the mesh CA required, renewed files picked up without a restart.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from meshserve.rpc.tls_files import TlsFiles

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 10.0  # a client that connects and says nothing holds one thread this long, no more


class ServerTls:
    """An ssl.SSLContext for an HTTPS listener: this process's certificate, client certificates of the mesh CA
    required. `refresh()` loads renewed files into the same context; handshakes from then on present them."""

    def __init__(self, files: TlsFiles):
        self.files = files
        material = files.read()  # fails early, with what is wrong, on missing or mismatched files
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=material.ca.decode())
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_cert_chain(files.cert, files.key)
        self._stamp = files.stamp()
        self._lock = threading.Lock()

    def refresh(self) -> None:
        stamp = self.files.stamp()
        if not stamp or stamp == self._stamp:
            return
        with self._lock:
            try:
                self.files.read()  # the key fits the certificate (a renewal writes one, then the other)
                self.context.load_cert_chain(self.files.cert, self.files.key)
            except (ValueError, OSError) as exc:  # TlsMaterialError, ssl.SSLError: keep the current one
                log.warning("keeping the current HTTPS certificate: %s", exc)
                return
            self._stamp = stamp
        log.info("reloaded HTTPS certificate %s", self.files.cert)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """For scraping a mesh process's HTTPS port: the mesh CA verifies it, our certificate identifies us.
    The name is not checked: the replicas' certificates name their service, not their address, and any
    certificate of the mesh CA belongs to one of the mesh's own processes."""
    material = files.read()
    context = ssl.create_default_context(cadata=material.ca.decode())
    context.check_hostname = False
    context.load_cert_chain(files.cert, files.key)
    return context


class _QuietHandler(WSGIRequestHandler):
    timeout = HANDSHAKE_TIMEOUT_S

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds are not worth a log line each."""


class _HttpsMetricsServer(ThreadingWSGIServer):
    tls: ServerTls

    def get_request(self) -> tuple[ssl.SSLSocket, object]:
        self.tls.refresh()  # before accepting: the handshake of this connection uses a renewed certificate
        return super().get_request()  # type: ignore[return-value]

    def handle_error(self, request: object, client_address: object) -> None:
        """A refused handshake (no certificate, another CA) is the listener doing its job, not a traceback."""
        log.info("metrics: %s refused: %s", client_address, sys.exc_info()[1])


def serve_metrics(port: int, host: str, registry: CollectorRegistry, tls: TlsFiles | None) -> int:
    """Serve /metrics of `registry` on `port` (0: any free one) from a daemon thread, over HTTPS requiring a
    mesh client certificate when `tls` is given; return the bound port."""
    base: type[WSGIServer] = ThreadingWSGIServer if tls is None else _HttpsMetricsServer

    class Server(base):  # type: ignore[valid-type,misc]
        address_family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]  # IPv6 hosts too

    server = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_QuietHandler)
    if isinstance(server, _HttpsMetricsServer) and tls is not None:
        server.tls = ServerTls(tls)
        # The handshake runs on first read, in the request's own thread: a silent client cannot stall accept().
        server.socket = server.tls.context.wrap_socket(server.socket, server_side=True,
                                                       do_handshake_on_connect=False)  # fmt: skip
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return int(server.server_port)
