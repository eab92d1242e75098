"""ModelServer: one model served by a GrpcProcess (health, reflection, registration, a clean stop).

Its start is load + warm up off the event loop; its drain waits for admitted Predicts. The
lifecycle itself is meshserve/rpc/process.py's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from meshserve.registry.config import METRICS_PORT_META, RegistryConfig, ServiceInstance
from meshserve.rpc.process import GrpcProcess, ProcessConfig
from meshserve.rpc.tls_files import TlsFiles
from meshserve.servers.batching import Admission, Batcher, BatchingConfig
from meshserve.servers.metrics import ServerMetrics
from meshserve.servers.model import Model
from meshserve.servers.oip import OIP_SERVICE_NAME, OipServicer
from meshserve.servers.servicer import SERVICE_NAME, PredictionServicer

log = logging.getLogger(__name__)


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
    metrics_port: int | None = None  # None: no /metrics; 0: any free port (registered in the meta)
    http_port: int | None = None  # Open Inference Protocol over HTTP/REST on this port (None: off)
    register: bool = True
    registry: RegistryConfig | None = None
    instance_id: str | None = None
    check_interval_s: float = 1.0
    deregister_critical_after_s: float = 60.0
    trace_file: Path | None = None
    port_file: Path | None = None
    resync_interval_s: float = 10.0  # how often the server checks that its agent still lists it
    tls: TlsFiles | None = None  # mutual TLS on the gRPC port (None: plaintext)

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
    """Wraps one model and serves it until told to stop: the model's part of a GrpcProcess."""

    def __init__(self, model: Model, config: ServerConfig):
        self.model = model
        self.config = config
        self.metrics = ServerMetrics(model.name, model.version)
        self.services = (SERVICE_NAME, OIP_SERVICE_NAME)
        self._admission = Admission(config.batching.max_inflight)
        self._batcher = Batcher(model, config.batching, self.metrics)
        self._servicer = PredictionServicer(model, self._batcher, self._admission, config.batching.max_batch_size,
                                            self.metrics.deadline_seen)  # fmt: skip
        self._oip = OipServicer(self._servicer)
        self._http_port = config.http_port  # the bound one once listening (config may say 0: any)
        self.metrics.watch_inflight(lambda: self._admission.count)
        self._metrics_port: int | None = None  # bound once run() serves /metrics
        process = ProcessConfig(
            service_name=config.service_name, host=config.host, port=config.port,
            max_message_bytes=config.max_message_bytes, grace_s=config.grace_s,
            registry=config.registry if config.register else None,
            resync_interval_s=config.resync_interval_s, port_file=config.port_file, trace_file=config.trace_file,
            tls=config.tls,
        )  # fmt: skip
        self._process = GrpcProcess(self, process, self.metrics.request_done, {"model": model.name})

    @property
    def port(self) -> int:
        return self._process.port

    def request_stop(self) -> None:
        self._process.request_stop()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or request_stop()); return the exit code."""
        cfg = self.config
        keep_message_buffers(cfg.max_message_bytes)
        if cfg.metrics_port is not None:
            self._metrics_port = self.metrics.serve(cfg.metrics_port, tls=cfg.tls)
        if cfg.http_port is None:
            return await self._process.run()
        from meshserve.servers.oip_http import OipHttp

        http = OipHttp(self._oip, self.metrics, cfg.host, cfg.http_port, cfg.max_message_bytes, cfg.tls)
        try:
            self._http_port = await http.start()  # before the model loads: health answers "not ready" meanwhile
        except OSError as exc:
            log.error("cannot serve OIP over HTTP on %s:%d: %s", cfg.host, cfg.http_port, exc)
            await http.stop()
            return 1
        try:
            return await self._process.run()
        finally:
            await http.stop()

    # -- the Workload protocol (meshserve.rpc.process) ---------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        self._servicer.add_to_server(server)
        self._oip.add_to_server(server)

    async def start(self) -> None:
        try:
            await self._batcher.run_on_model_thread(self.model.load)
        except Exception as exc:
            raise RuntimeError(f"model {self.model.name} {self.model.version} failed to load: {exc}") from exc
        await self._batcher.run_on_model_thread(self.model.warmup)
        self._batcher.start()
        self._servicer.mark_ready()
        log.info("model %s %s loaded and warm", self.model.name, self.model.version)

    def instance(self, port: int) -> ServiceInstance:
        cfg = self.config
        address = cfg.registered_address
        meta = {"model": self.model.name, "version": self.model.version, "role": self.model.role}
        meta.update(self.model.meta())
        meta.update(protocol_meta(self._http_port, https=cfg.tls is not None))
        if self._metrics_port is not None:
            meta[METRICS_PORT_META] = str(self._metrics_port)
        return ServiceInstance(
            name=cfg.service_name,
            instance_id=cfg.instance_id or f"{cfg.service_name}-{address}-{port}",
            address=address,
            port=port,
            meta=meta,
            check_interval_s=cfg.check_interval_s,
            check_timeout_s=cfg.check_interval_s,
            deregister_critical_after_s=cfg.deregister_critical_after_s,
            grpc_health_service=SERVICE_NAME,
        )

    def instances(self, port: int) -> list[ServiceInstance]:
        """One registration per shard when the model serves several (each with its shard's meta and
        an id naming the shard, all at this address and port); else the one of instance()."""
        shards = self.model.shard_meta()
        if len(shards) <= 1:
            return [self.instance(port)]
        base = self.instance(port)
        registrations = []
        for shard, shard_meta in shards.items():
            meta = {**base.meta, **shard_meta}
            meta.pop("shards", None)
            registrations.append(replace(base, instance_id=f"{base.instance_id}-{shard}", meta=meta))
        return registrations

    def release_shard(self, shard: str, reason: str) -> None:
        if self._servicer.release_shard(shard, reason):
            log.info("let go of shard %s: %s", shard, reason)

    def begin_draining(self) -> None:
        self._servicer.draining = True

    def in_flight(self) -> int:
        return self._admission.count

    async def close(self) -> None:
        await self._batcher.close()


PROTOCOLS_META = "protocols"  # registry meta key: what the server speaks, comma-separated
HTTP_PORT_META = "http_port"  # registry meta key: the OIP HTTP port, when there is one
HTTP_SCHEME_META = "http_scheme"  # registry meta key: "https" when that port wants a mesh client certificate


def protocol_meta(http_port: int | None, https: bool = False) -> dict[str, str]:
    """Registry meta naming the protocols on the gRPC port (and the HTTP port when served)."""
    protocols = ["meshserve-v1", "oip-v2-grpc"]
    if http_port is None:
        return {PROTOCOLS_META: ",".join(protocols)}
    meta = {PROTOCOLS_META: ",".join([*protocols, "oip-v2-http"]), HTTP_PORT_META: str(http_port)}
    return {**meta, HTTP_SCHEME_META: "https"} if https else meta


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
