"""Running a job's payload: the same call a synchronous client makes, to a gateway found in the
registry (PhotoSearch/Search for `search`, ListingGuard/Check for `check`), with the run's deadline."""

from __future__ import annotations

import itertools
import logging
import time

import grpc

from meshserve import telemetry
from meshserve.errors import NotReady
from meshserve.registry.config import SERVICE_NAMES, RegistryConfig
from meshserve.rpc.tls import ClientCredentials, aio_channel
from meshserve.rpc.tls_files import TlsFiles
from meshserve.v1 import jobs_pb2, listing_guard_pb2_grpc, photo_search_pb2_grpc

log = logging.getLogger(__name__)

_OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024)]  # fmt: skip


class RunFailed(Exception):
    """One run of a job failed; the job may succeed on another delivery."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class GatewayRunner:
    """Sends each job to a passing gateway (round robin), or to `target` when one is given."""

    REFRESH_S = 5.0

    def __init__(self, registry: RegistryConfig | None, target: str | None = None, tls_files: TlsFiles | None = None):
        self.registry = registry
        self._credentials = ClientCredentials(tls_files) if tls_files is not None else None
        self.fixed = target
        self._targets: list[str] = [target] if target else []
        self._refreshed = 0.0
        self._turn = itertools.count()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: list[grpc.aio.Channel] = []  # opened with a certificate since renewed; closed at close()
        self._stamp = tls_files.stamp() if tls_files is not None else ()

    async def run(self, request: jobs_pb2.SubmitJobRequest, deadline: float) -> jobs_pb2.Job:
        """A Job holding the result of `request`'s payload; RunFailed when the call fails."""
        kind = request.WhichOneof("payload")
        channel = self._channel(await self._target())
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise RunFailed("DEADLINE_EXCEEDED", "no time left for this run")
        metadata = telemetry.inject_metadata()
        try:
            if kind == "search":
                reply = await photo_search_pb2_grpc.PhotoSearchStub(channel).Search(
                    request.search, timeout=timeout, metadata=metadata)
                return jobs_pb2.Job(search=reply)
            if kind == "check":
                verdicts = await listing_guard_pb2_grpc.ListingGuardStub(channel).Check(
                    request.check, timeout=timeout, metadata=metadata)
                return jobs_pb2.Job(check=verdicts)
        except grpc.aio.AioRpcError as exc:
            raise RunFailed(exc.code().name, exc.details() or "") from exc
        raise RunFailed("INVALID_ARGUMENT", f"unknown job kind {kind!r}")

    async def _target(self) -> str:
        if self.fixed:
            return self.fixed
        if self.registry is not None and time.monotonic() - self._refreshed > self.REFRESH_S:
            from meshserve.registry.client import passing_instances

            try:
                found = await passing_instances(self.registry, SERVICE_NAMES["gateway"])
                self._targets = [i.target for i in found]
                self._refreshed = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - the registry away: use the gateways last seen
                log.warning("cannot read gateways from the registry: %s", exc)
        if not self._targets:
            raise RunFailed("UNAVAILABLE", str(NotReady("no passing meshserve-gateway in the registry")))
        return self._targets[next(self._turn) % len(self._targets)]

    def _channel(self, target: str) -> grpc.aio.Channel:
        if self._credentials is not None and (stamp := self._credentials.files.stamp()) != self._stamp:
            # a channel keeps the certificate it was opened with, also for reconnects: new ones present the renewed
            self._stamp = stamp
            self._retired += self._channels.values()
            self._channels.clear()
        if target not in self._channels:
            self._channels[target] = aio_channel(target, SERVICE_NAMES["gateway"], _OPTIONS, self._credentials)
        return self._channels[target]

    async def close(self) -> None:
        for channel in [*self._channels.values(), *self._retired]:
            await channel.close()
        self._channels.clear()
        self._retired.clear()
