"""The gateway's channels to replicas: plaintext, or mTLS that checks the replica is the service it registered as."""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING

import grpc

from meshserve.registry.instances import Instance
from meshserve.rpc.channel_options import client_options
from meshserve.rpc.tls import ClientCredentials, aio_channel
from meshserve.rpc.tls_files import TlsFiles

if TYPE_CHECKING:
    from meshserve.gateway.balancer import ReplicaSet

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
RENEWAL_CHECK_S = 10.0


class MeshChannels:
    """A ChannelFactory that also opens channels per instance (balancer.InstanceChannels): with TLS files, the
    replica's certificate must name the service the instance is registered under, so a server holding another
    service's certificate fails the handshake and is never called."""

    def __init__(self, tls: TlsFiles | None, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.credentials = ClientCredentials(tls) if tls is not None else None
        self._options = [*client_options(max_message_bytes), ("grpc.enable_retries", 0)]
        self._tracked: weakref.WeakSet[ReplicaSet] = weakref.WeakSet()

    @property
    def secure(self) -> bool:
        return self.credentials is not None

    def __call__(self, target: str) -> grpc.aio.Channel:
        """A channel to an address with no registration behind it (plaintext only: TLS needs a service name)."""
        if self.credentials is not None:
            raise ValueError(f"a TLS channel to {target} needs the service it serves: use for_instance()")
        return aio_channel(target, "", self._options, None)

    def for_instance(self, instance: Instance) -> grpc.aio.Channel:
        return aio_channel(instance.target, instance.name, self._options, self.credentials)

    def track(self, replicas: ReplicaSet) -> None:
        self._tracked.add(replicas)

    async def follow_renewals(self, every_s: float = RENEWAL_CHECK_S) -> None:
        """Reopen every tracked replica set's channels once this process's certificate files change, so the
        renewed certificate is the one presented, also when a connection is made again later."""
        if self.credentials is None:
            return
        files = self.credentials.files
        seen = files.stamp()
        while True:
            await asyncio.sleep(every_s)
            stamp = files.stamp()
            if stamp and stamp != seen:
                seen = stamp
                sets = list(self._tracked)
                for replicas in sets:
                    replicas.reopen()
                log.info("client certificate renewed: reopened the channels of %d replica set(s)", len(sets))
