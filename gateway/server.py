"""The gateway process: discover, then serve PhotoSearch with health and reflection; register; stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from meshserve import telemetry
from meshserve.gateway.enrich import CatalogueEnricher
from meshserve.gateway.photo_search import PhotoSearch, SearchConfig
from meshserve.gateway.policy import default_policies
from meshserve.gateway.routes import RouteTable
from meshserve.gateway.servicer import PhotoSearchServicer
from meshserve.registry import client
from meshserve.registry.config import SERVICE_NAMES, RegistryConfig, ServiceInstance
from meshserve.registry.keeper import keep_registered
from meshserve.v1 import photo_search_pb2, photo_search_pb2_grpc

log = logging.getLogger(__name__)

PHOTO_SEARCH = photo_search_pb2.DESCRIPTOR.services_by_name["PhotoSearch"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class GatewayConfig:
    registry: RegistryConfig
    host: str = "127.0.0.1"
    port: int = 50050
    advertise_address: str | None = None
    metrics_port: int | None = None
    register: bool = True
    max_message_bytes: int = 10 * 1024 * 1024
    grace_s: float = 10.0
    hedge_after_ms: float | None = None
    default_deadline_s: float = 10.0
    catalogue_home: Path | None = None
    catalogue_ttl_s: float = 60.0
    check_interval_s: float = 1.0
    port_file: Path | None = None
    trace_file: Path | None = None
    search: SearchConfig = field(default_factory=SearchConfig)


async def run_gateway(config: GatewayConfig) -> int:
    telemetry.setup_tracing(telemetry.TracingConfig.from_env("meshserve-gateway", config.trace_file))
    routes = RouteTable(config.registry, default_policies(config.hedge_after_ms))
    search = PhotoSearch(routes, CatalogueEnricher(config.catalogue_home, config.catalogue_ttl_s), config.search)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", config.max_message_bytes),
                                      ("grpc.max_send_message_length", config.max_message_bytes)])  # fmt: skip
    photo_search_pb2_grpc.add_PhotoSearchServicer_to_server(
        PhotoSearchServicer(search, config.default_deadline_s), server
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (PHOTO_SEARCH, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    for name in ("", PHOTO_SEARCH):
        await health.set(name, NOT_SERVING)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    if config.metrics_port is not None:
        start_http_server(config.metrics_port, addr=config.host)
    if config.port_file is not None:
        config.port_file.write_text(f"{port}\n")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await routes.start()
    for name in ("", PHOTO_SEARCH):
        await health.set(name, SERVING)
    log.info("gateway serving on %s:%d (registry %s%s)", config.host, port, config.registry.http_addr,
             ", stale" if routes.stale else "")  # fmt: skip
    instance = ServiceInstance(
        name=SERVICE_NAMES["gateway"],
        instance_id=f"{SERVICE_NAMES['gateway']}-{config.advertise_address or config.host}-{port}",
        address=config.advertise_address or config.host, port=port,
        meta={"model": "gateway", "version": "1", "role": "gateway"},
        check_interval_s=config.check_interval_s, check_timeout_s=config.check_interval_s,
        grpc_health_service=PHOTO_SEARCH,
    )  # fmt: skip
    registration: asyncio.Task[None] | None = None
    if config.register:
        registration = asyncio.create_task(keep_registered(config.registry, instance, stop))
    try:
        await stop.wait()
    finally:
        log.info("stopping: NOT_SERVING, deregistering, draining")
        await health.enter_graceful_shutdown()
        if registration is not None:
            registration.cancel()
            await asyncio.gather(registration, return_exceptions=True)
            try:
                await asyncio.wait_for(client.deregister(config.registry, instance.instance_id), 3.0)
            except Exception as exc:  # noqa: BLE001
                log.warning("gateway deregistration failed: %s", exc)
        await server.stop(config.grace_s)
        await routes.close()
        telemetry.shutdown_tracing()
    return 0
