"""GrpcProcess: the lifecycle every meshserve server shares, model servers and the gateway alike.

listen (health NOT_SERVING) → workload.start() (load and warm, or discover) → SERVING → register in
Consul and stay registered → … SIGTERM/SIGINT → NOT_SERVING → deregister → drain in-flight calls
within the grace period → stop the server → workload.close() → exit code. A workload whose ability
to serve comes and goes after start (the gateway without a route) reports it per service
(ReportsReadiness), and health follows those reports instead of turning SERVING once.

The workload says what is served and what starting and draining mean for it; the process owns the
grpc.aio server, health, reflection, the StatusInterceptor over the workload's services, signals
and registration.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from meshserve import telemetry
from meshserve.errors import InvalidInput
from meshserve.registry.config import METRICS_PORT_META, METRICS_SCHEME_META, RegistryConfig, ServiceInstance
from meshserve.rpc.channel_options import server_options
from meshserve.rpc.interceptor import Observe, StatusInterceptor
from meshserve.rpc.tls import server_credentials
from meshserve.rpc.tls_files import TlsFiles

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Workload(Protocol):
    """What one process serves, and its part of the lifecycle."""

    @property
    def services(self) -> Sequence[str]:
        """Full gRPC service names; health reports each of them and the whole server ("")."""

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None:
        """Get ready to serve (load and warm a model, discover routes). Raising stops the process."""

    def instance(self, port: int) -> ServiceInstance:
        """How this process registers in Consul once it serves on `port`."""

    def begin_draining(self) -> None:
        """Stop admitting new calls; calls already admitted finish."""

    def in_flight(self) -> int:
        """Admitted calls not finished yet (the drain waits for them within the grace period)."""

    async def close(self) -> None:
        """Release what start() took, after the server stopped."""


@runtime_checkable
class RegistersSeveral(Protocol):
    """A workload registered more than once (an indexer serving several shards: one per shard)."""

    def instances(self, port: int) -> Sequence[ServiceInstance]:
        """Every registration of this process once it serves on `port` (instead of instance())."""


@runtime_checkable
class ReleasesShards(Protocol):
    """A workload that can let go of a shard withdrawn for good (`shard retire`), freeing its memory."""

    def release_shard(self, shard: str, reason: str) -> None:
        """Serve `shard` no more; `reason` is what later calls naming it are told."""


@runtime_checkable
class ReportsReadiness(Protocol):
    """A workload that can be started yet unable to serve (the gateway while it has no route)."""

    def watch_readiness(self, report: Callable[[str, bool], None]) -> None:
        """Call `report(service, ready)` for the whole server ("") and each of its services now,
        and again whenever one of them changes, until close()."""


@dataclass(frozen=True)
class ProcessConfig:
    """How the process listens, traces, registers and stops. Built from a model server's or the
    gateway's own config."""

    service_name: str  # Consul service name, also the trace's service.name
    host: str
    port: int
    max_message_bytes: int
    grace_s: float
    registry: RegistryConfig | None  # None: do not register
    resync_interval_s: float = 10.0
    port_file: Path | None = None
    trace_file: Path | None = None
    tls: TlsFiles | None = None  # None: plaintext; else mTLS, client certificates from the mesh CA required


class GrpcProcess:
    """Runs one workload behind grpc.aio until told to stop."""

    def __init__(
        self,
        workload: Workload,
        config: ProcessConfig,
        observe: Observe,
        span_attributes: Mapping[str, str] | None = None,
    ):
        """`observe(method, status, seconds)` counts every call of the workload's services;
        `span_attributes` go on each of their server spans."""
        self.workload = workload
        self.config = config
        self.port = 0
        self._interceptor = StatusInterceptor(workload.services, observe, span_attributes)
        self._stop = asyncio.Event()
        self._registered_ids: list[str] = []
        self._exit_code = 0
        self._health_lock = asyncio.Lock()  # FIFO: readiness reports reach health in their order
        self._health_updates: set[asyncio.Task[None]] = set()
        self._reported: dict[str, bool] = {}  # the last readiness reported per service ("": the server)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or request_stop()); return the exit code."""
        cfg = self.config
        telemetry.setup_tracing(telemetry.TracingConfig.from_env(cfg.service_name, cfg.trace_file))
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port already taken fails loudly instead of being shared
            *server_options(),
        ]
        server = grpc.aio.server(interceptors=(self._interceptor,), options=options)
        self.workload.add_to_server(server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        services = tuple(self.workload.services)
        reflection.enable_server_reflection((*services, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        for name in ("", *services):
            await health.set(name, NOT_SERVING)
        if cfg.tls is None:
            self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        else:
            self.port = server.add_secure_port(f"{cfg.host}:{cfg.port}", server_credentials(cfg.tls))
        await server.start()
        log.info("listening on %s:%d (%s)", cfg.host, self.port, ", ".join(services))
        if cfg.port_file is not None:
            cfg.port_file.write_text(f"{self.port}\n")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        registration: asyncio.Task[None] | None = None
        try:
            if await self._start() and not self._stop.is_set():
                if isinstance(self.workload, ReportsReadiness):
                    self.workload.watch_readiness(lambda name, ready: self._report(health, name, ready))
                else:
                    await self._set_health(health, ("", *services), True)
                if cfg.registry is not None:
                    registration = asyncio.create_task(self._register_until_done(cfg.registry))
                await self._stop.wait()
        finally:
            await self._shutdown(server, health, registration)
        return self._exit_code

    def _report(self, health: health_aio.HealthServicer, name: str, ready: bool) -> None:
        # (a report after shutdown began changes nothing: health stays NOT_SERVING)
        if self._reported.get(name) == ready:
            return
        self._reported[name] = ready
        task = asyncio.get_running_loop().create_task(self._set_health(health, (name,), ready))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _set_health(self, health: health_aio.HealthServicer, names: tuple[str, ...], ready: bool) -> None:
        async with self._health_lock:
            for name in names:
                await health.set(name, SERVING if ready else NOT_SERVING)
        described = ", ".join(name or "the whole server" for name in names)
        if ready:
            log.info("serving on port %d (%s)", self.port, described)
        else:
            log.warning("not serving: %s cannot serve now (health NOT_SERVING)", described)

    async def _start(self) -> bool:
        """workload.start(), unless stopped first; a stop during start waits for it to finish."""
        began = time.perf_counter()
        start = asyncio.ensure_future(self.workload.start())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait((start, stop), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not start.done():
            log.warning("stop requested while starting; exiting after start finishes")
        try:
            await start
        except Exception as exc:  # never registered, never SERVING: say why and exit non-zero
            log.exception("failed to start: %s", exc)
            self._exit_code = 1
            self._stop.set()
            return False
        log.info("ready in %.2fs", time.perf_counter() - began)
        return True

    async def _register_until_done(self, registry: RegistryConfig) -> None:
        """Register once ready and stay registered (re-registering if the agent forgets us);
        while Consul is away, keep trying and keep serving."""
        if isinstance(self.workload, RegistersSeveral):
            instances = list(self.workload.instances(self.port))
        else:
            instances = [self.workload.instance(self.port)]
        await asyncio.gather(*(self._keep_registered(registry, instance) for instance in instances))

    async def _keep_registered(self, registry: RegistryConfig, instance: ServiceInstance) -> None:
        from meshserve.registry.keeper import keep_registered

        if self.config.tls is not None:  # the registry's gRPC check speaks TLS and verifies the service's name
            instance = replace(instance, tls_server_name=instance.name)
            if METRICS_PORT_META in instance.meta:  # and /metrics is served over mTLS too (rpc/https.py)
                instance = replace(instance, meta={**instance.meta, METRICS_SCHEME_META: "https"})

        def registered() -> None:
            self._registered_ids.append(instance.instance_id)

        withdrawn = None
        if shard := instance.meta.get("shard"):  # an index shard: `shard retire` keeps it out
            from meshserve.registry.retired_shards import withdrawn_shard

            withdrawn = functools.partial(withdrawn_shard, shard=shard)
        try:
            await keep_registered(registry, instance, self._stop, self.config.resync_interval_s, registered,
                                  withdrawn)  # fmt: skip
            if not self._stop.is_set():  # withdrawn for good: deregistered already, and its shard can go
                if instance.instance_id in self._registered_ids:
                    self._registered_ids.remove(instance.instance_id)
                if shard and isinstance(self.workload, ReleasesShards):
                    self.workload.release_shard(shard, f"shard {shard} was retired")
        except InvalidInput as exc:  # retrying cannot fix it: say so and stop
            log.error("cannot register: %s", exc)
            self._exit_code = 2
            self._stop.set()

    async def _deregister(self) -> None:
        registry = self.config.registry
        if not self._registered_ids or registry is None:
            return
        from meshserve.registry import client

        async def one(instance_id: str) -> None:
            try:
                await asyncio.wait_for(client.deregister(registry, instance_id), timeout=3.0)
            except Exception as exc:  # Consul's critical-check reaper will remove it later
                log.warning("deregister of %s failed: %s", instance_id, exc)

        await asyncio.gather(*(one(instance_id) for instance_id in self._registered_ids))

    async def _shutdown(
        self,
        server: grpc.aio.Server,
        health: health_aio.HealthServicer,
        registration: asyncio.Task[None] | None,
    ) -> None:
        deadline = time.monotonic() + self.config.grace_s
        log.info("stopping: NOT_SERVING, deregistering, draining %d in-flight call(s)", self.workload.in_flight())
        self.workload.begin_draining()
        await health.enter_graceful_shutdown()
        if registration is not None:
            registration.cancel()
            await asyncio.gather(registration, return_exceptions=True)
        await self._deregister()
        # Health and reflection keep answering while admitted calls finish; new calls get
        # UNAVAILABLE from the draining workload, so callers retry on another replica.
        while self.workload.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.workload.in_flight():
            log.warning("grace period over with %d call(s) still in flight", self.workload.in_flight())
        await server.stop(max(0.0, deadline - time.monotonic()))
        await self.workload.close()
        telemetry.shutdown_tracing()
        log.info("stopped")
