"""Mutual TLS credentials for the mesh's gRPC: server credentials that reload renewed files, client credentials."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from meshserve.rpc.tls_files import TlsFiles, TlsMaterial, TlsMaterialError

log = logging.getLogger(__name__)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials that require a client certificate from the mesh CA and re-read the files when they
    change, so a renewed certificate is presented from the next handshake on, without a restart."""
    state = {"stamp": files.stamp()}

    def configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(material.key, material.cert)],
                                                         root_certificates=material.ca)  # fmt: skip

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # called by gRPC before each handshake; None keeps the current configuration
        stamp = files.stamp()
        if not stamp or stamp == state["stamp"]:
            return None
        try:
            material = files.read()
        except TlsMaterialError as exc:
            log.warning("keeping the current certificate: %s", exc)
            return None
        state["stamp"] = stamp
        log.info("reloaded TLS certificate %s", files.cert)
        return configuration(material)

    return grpc.dynamic_ssl_server_credentials(configuration(files.read()), fetch,
                                               require_client_authentication=True)  # fmt: skip


class ClientCredentials:
    """Channel credentials from TlsFiles, re-read when the files change: a channel opened after a renewal
    presents the new certificate."""

    def __init__(self, files: TlsFiles):
        self.files = files
        self._stamp: tuple[int, ...] = ()
        self._credentials: grpc.ChannelCredentials | None = None

    def get(self) -> grpc.ChannelCredentials:
        stamp = self.files.stamp()
        if self._credentials is None or stamp != self._stamp:
            material = self.files.read()
            self._credentials = grpc.ssl_channel_credentials(material.ca, material.key, material.cert)
            self._stamp = stamp
        return self._credentials


def server_name_options(server_name: str) -> list[tuple[str, str]]:
    """The name the server's certificate must carry: the service the caller means to reach."""
    return [("grpc.ssl_target_name_override", server_name)]


def channel(target: str, server_name: str, options: list[tuple[str, Any]], files: TlsFiles | None) -> grpc.Channel:
    """A blocking channel: mTLS verifying `server_name` when `files` are given, plaintext otherwise."""
    if files is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, ClientCredentials(files).get(), options=[*options,
                               *server_name_options(server_name)])  # fmt: skip


def aio_channel(target: str, server_name: str, options: list[tuple[str, Any]],
                credentials: ClientCredentials | None) -> grpc.aio.Channel:  # fmt: skip
    """An asyncio channel: mTLS verifying `server_name` when `credentials` are given, plaintext otherwise."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials.get(), options=[*options, *server_name_options(server_name)])
