"""ModelServer: one model behind grpc.aio with health, reflection, registration and a clean stop.

Lifecycle: listen (health NOT_SERVING) → load + warm up off the loop → SERVING → register in
Consul → … SIGTERM/SIGINT → NOT_SERVING → deregister → drain in-flight calls within the grace
period → stop the server → exit 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from meshserve import telemetry
from meshserve.errors import InvalidInput
from meshserve.registry.config import RegistryConfig, ServiceInstance
from meshserve.servers.batching import Admission, Batcher, BatchingConfig
from meshserve.servers.metrics import ServerMetrics
from meshserve.servers.model import Model
from meshserve.servers.servicer import SERVICE_NAME, PredictionServicer

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerConfig:
    """Everything a ModelServer needs besides its model. Built once from flags and env."""

    service_name: str  # Consul service name, e.g. meshserve-embedder
    host: str = "127.0.0.1"  # address to bind
    port: int = 0  # 0 = any free port (logged, and written to port_file)
    advertise_address: str | None = None  # address registered in Consul (default: host)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    max_message_bytes: int = 8 * 1024 * 1024
    grace_s: float = 10.0  # drain budget after SIGTERM
    metrics_port: int | None = None
    register: bool = True
    registry: RegistryConfig | None = None
    instance_id: str | None = None
    check_interval_s: float = 1.0
    deregister_critical_after_s: float = 60.0
    trace_file: Path | None = None
    port_file: Path | None = None
    resync_interval_s: float = 10.0  # how often the server checks that its agent still lists it

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        if self.grace_s < 0:
            raise ValueError("grace must be >= 0 seconds")
        if self.register and self.registry is None:
            raise ValueError("register=True needs a RegistryConfig (or pass --no-register)")

    @property
    def registered_address(self) -> str:
        if self.advertise_address:
            return self.advertise_address
        if self.host in ("", "0.0.0.0", "::", "[::]"):
            return socket.gethostbyname(socket.gethostname())
        return self.host


class ModelServer:
    """Wraps one model and serves it until told to stop."""

    def __init__(self, model: Model, config: ServerConfig):
        self.model = model
        self.config = config
        self.metrics = ServerMetrics(model.name, model.version)
        self.port = 0
        self._stop = asyncio.Event()
        self._registered_id: str | None = None
        self._exit_code = 0

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or request_stop()); return the exit code."""
        cfg = self.config
        keep_message_buffers(cfg.max_message_bytes)
        tracing = telemetry.setup_tracing(
            telemetry.TracingConfig.from_env(cfg.service_name, cfg.trace_file)
        )
        if cfg.metrics_port is not None:
            self.metrics.serve(cfg.metrics_port)
        batcher = Batcher(self.model, cfg.batching, self.metrics)
        admission = Admission(cfg.batching.max_inflight)
        self.metrics.watch_inflight(lambda: admission.count)
        servicer = PredictionServicer(
            self.model, batcher, admission, self.metrics, cfg.batching.max_batch_size, tracing
        )
        health = health_aio.HealthServicer()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        servicer.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
        for name in ("", SERVICE_NAME):
            await health.set(name, NOT_SERVING)
        self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        await server.start()
        log.info("listening on %s:%d (%s), loading %s %s", cfg.host, self.port,
                 cfg.service_name, self.model.name, self.model.version)  # fmt: skip
        if cfg.port_file is not None:
            cfg.port_file.write_text(f"{self.port}\n")
        self._install_signal_handlers()
        register_task: asyncio.Task[None] | None = None
        try:
            try:
                await self._load(batcher)
            except Exception:  # never registered, never SERVING: say why and exit non-zero
                log.exception("model %s %s failed to load", self.model.name, self.model.version)
                self._exit_code = 1
                self._stop.set()
            if not self._stop.is_set():
                batcher.start()
                servicer.mark_ready()
                for name in ("", SERVICE_NAME):
                    await health.set(name, SERVING)
                log.info("serving %s %s on port %d", self.model.name, self.model.version,
                         self.port)  # fmt: skip
                if cfg.register:
                    register_task = asyncio.create_task(self._register_until_done())
                await self._stop.wait()
        finally:
            await self._shutdown(server, health, servicer, admission, batcher, register_task)
        return self._exit_code

    async def _load(self, batcher: Batcher) -> None:
        started = time.perf_counter()
        load = asyncio.ensure_future(batcher.run_on_model_thread(self.model.load))
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait((load, stop), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not load.done():
            log.warning("stop requested while loading; exiting after load finishes")
            await load
            return
        load.result()
        await batcher.run_on_model_thread(self.model.warmup)
        log.info("model loaded and warm in %.2fs", time.perf_counter() - started)

    def _instance(self) -> ServiceInstance:
        cfg = self.config
        address = cfg.registered_address
        meta = {"model": self.model.name, "version": self.model.version, "role": self.model.role}
        meta.update(self.model.meta())
        return ServiceInstance(
            name=cfg.service_name,
            instance_id=cfg.instance_id or f"{cfg.service_name}-{address}-{self.port}",
            address=address,
            port=self.port,
            meta=meta,
            check_interval_s=cfg.check_interval_s,
            check_timeout_s=cfg.check_interval_s,
            deregister_critical_after_s=cfg.deregister_critical_after_s,
            grpc_health_service=SERVICE_NAME,
        )

    async def _register_until_done(self) -> None:
        """Register once ready and stay registered (re-registering if the agent forgets us);
        while Consul is away, keep trying and keep serving."""
        from meshserve.registry.keeper import keep_registered

        assert self.config.registry is not None
        instance = self._instance()

        def registered() -> None:
            self._registered_id = instance.instance_id

        try:
            await keep_registered(self.config.registry, instance, self._stop, self.config.resync_interval_s,
                                  registered)  # fmt: skip
        except InvalidInput as exc:  # retrying cannot fix it: say so and stop
            log.error("cannot register: %s", exc)
            self._exit_code = 2
            self._stop.set()

    async def _deregister(self) -> None:
        if self._registered_id is None or self.config.registry is None:
            return
        from meshserve.registry import client

        try:
            await asyncio.wait_for(
                client.deregister(self.config.registry, self._registered_id), timeout=3.0
            )
        except Exception as exc:  # Consul's critical-check reaper will remove it later
            log.warning("deregister of %s failed: %s", self._registered_id, exc)

    async def _shutdown(
        self,
        server: grpc.aio.Server,
        health: health_aio.HealthServicer,
        servicer: PredictionServicer,
        admission: Admission,
        batcher: Batcher,
        register_task: asyncio.Task[None] | None,
    ) -> None:
        deadline = time.monotonic() + self.config.grace_s
        log.info("stopping: NOT_SERVING, deregistering, draining %d in-flight call(s)",
                 admission.count)  # fmt: skip
        servicer.draining = True
        await health.enter_graceful_shutdown()
        if register_task is not None:
            register_task.cancel()
            await asyncio.gather(register_task, return_exceptions=True)
        await self._deregister()
        # Health and reflection keep answering while admitted calls finish; new Predicts
        # get UNAVAILABLE so callers retry on another replica.
        while admission.count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if admission.count:
            log.warning("grace period over with %d call(s) still in flight", admission.count)
        await server.stop(max(0.0, deadline - time.monotonic()))
        await batcher.close()
        telemetry.shutdown_tracing()
        log.info("stopped")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)


_M_TRIM_THRESHOLD = -1  # glibc mallopt() parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def keep_message_buffers(max_message_bytes: int) -> bool:
    """Let glibc malloc reuse message-sized buffers instead of returning them to the OS.

    Every Predict allocates a few buffers the size of its message (grpc's request bytes, the
    parsed request, the response, its serialisation). By default glibc mmaps or trims such
    large blocks back to the kernel on free, so the next call page-faults them in again:
    measured ~2 ms of a 600 KB round trip on a VM. Serving blocks up to twice the message
    limit from the heap, and trimming only beyond four times that, makes them plain reuse.
    Costs at most that much idle heap after a burst. True when applied (Linux + glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mmap_threshold = min(32 << 20, max(1 << 20, 2 * max_message_bytes))  # glibc caps it at 32 MiB
    done = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return mallopt(_M_TRIM_THRESHOLD, 4 * mmap_threshold) == 1 and done


def configure_threads(threads: int) -> None:
    """Bound the math libraries' thread pools of this process (call before loading a model)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:  # only kinds that use torch pay for importing it
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # already set once this process ran parallel work
            pass
