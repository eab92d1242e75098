"""The gateway process: a GrpcProcess whose start discovers the routes and which serves PhotoSearch."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from prometheus_client import REGISTRY, Counter, Histogram

from meshserve import telemetry
from meshserve.gateway.admission import Admission
from meshserve.gateway.arms import Arms
from meshserve.gateway.enrich import CatalogueEnricher
from meshserve.gateway.flow_policy import PhotoSearchDefaults
from meshserve.gateway.guard_service import LISTING_GUARD_SERVICE, GuardService
from meshserve.gateway.guard_servicer import to_listing
from meshserve.gateway.jobs import JOBS, JobQueueLink, JobsServicer
from meshserve.gateway.mesh_channels import MeshChannels
from meshserve.gateway.photo_search import PhotoSearch, SearchConfig
from meshserve.gateway.policy import HEDGE_META, HEDGE_SHARDS_META, default_policies
from meshserve.gateway.rollout_store import RolloutPolicies
from meshserve.gateway.routes import RouteTable
from meshserve.gateway.servicer import PhotoSearchServicer, to_query
from meshserve.gateway.shadow import ShadowRunner
from meshserve.queue.config import QueueConfig
from meshserve.registry.config import METRICS_PORT_META, SERVICE_NAMES, RegistryConfig, ServiceInstance
from meshserve.rpc.https import serve_metrics
from meshserve.rpc.process import GrpcProcess, ProcessConfig
from meshserve.rpc.tls_files import TlsFiles
from meshserve.v1 import jobs_pb2_grpc, photo_search_pb2, photo_search_pb2_grpc
from meshserve.wire.images import load_decoders

log = logging.getLogger(__name__)

PHOTO_SEARCH = photo_search_pb2.DESCRIPTOR.services_by_name["PhotoSearch"].full_name
REQUESTS = Counter("meshserve_gateway_requests_total", "Gateway requests by method and status", ["method", "code"])
LATENCY = Histogram("meshserve_gateway_latency_seconds", "Gateway request latency", ["method"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))  # fmt: skip


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
    hedge_shards_after_ms: float | None = None
    default_deadline_s: float = 10.0
    catalogue_home: Path | None = None
    catalogue_ttl_s: float = 60.0
    check_interval_s: float = 1.0
    port_file: Path | None = None
    trace_file: Path | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    jobs: QueueConfig = field(default_factory=QueueConfig.from_env)
    nats_url: str | None = None  # None: $NATS_URL, else the registry's meshserve-nats, else the default
    tls: TlsFiles | None = None  # mTLS for its own port and its calls to replicas (None: plaintext)


def hedge_meta(config: GatewayConfig) -> dict[str, str]:
    """What this gateway hedges, for `meshserve status` (its call policies otherwise show the defaults)."""
    meta = {}
    if config.hedge_after_ms is not None:
        meta[HEDGE_META] = f"{config.hedge_after_ms:g}"
    if config.hedge_shards_after_ms is not None:
        meta[HEDGE_SHARDS_META] = f"{config.hedge_shards_after_ms:g}"
    return meta


class Gateway:
    """The gateway's part of a GrpcProcess: PhotoSearch over routes discovered in the registry."""

    services = (PHOTO_SEARCH, LISTING_GUARD_SERVICE, JOBS)

    def __init__(self, config: GatewayConfig):
        self.config = config
        channels = MeshChannels(config.tls)
        self.admission = Admission(channels)
        self.channels = channels
        self._renewals: asyncio.Task[None] | None = None
        policies = default_policies(config.hedge_after_ms, config.hedge_shards_after_ms)
        self.routes = RouteTable(config.registry, policies, channels, admission=self.admission)
        enricher = CatalogueEnricher(config.catalogue_home, config.catalogue_ttl_s)
        # Rollout policies (KV meshserve/rollout/<service>) choose each request's version and arm.
        self.rollouts = RolloutPolicies(config.registry)
        self.shadows = ShadowRunner()
        arms = Arms(self.rollouts)
        self.search = PhotoSearch(self.routes, enricher, config.search, arms, self.shadows)
        self.guard = GuardService(config.registry, self.routes, self.routes.policies, self._photo_defaults,
                                  channel_factory=channels, admission=self.admission, arms=arms,
                                  shadows=self.shadows)  # fmt: skip
        self._following: asyncio.Task[None] | None = None
        self._metrics_port: int | None = None  # bound by start(); 0 in the config means any free port
        self.jobs = JobQueueLink(config.registry, config.jobs, config.nats_url)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        servicer = PhotoSearchServicer(self.search, self.config.default_deadline_s)
        photo_search_pb2_grpc.add_PhotoSearchServicer_to_server(servicer, server)
        self.guard.add_to_server(server, self.config.default_deadline_s)
        validators = {
            "search": lambda request: self.search.validate(to_query(request)),
            "check": lambda request: self.guard.guard.validate(to_listing(request), tuple(request.models)),
        }
        jobs_pb2_grpc.add_JobsServicer_to_server(JobsServicer(self.jobs, validators), server)

    async def start(self) -> None:
        if self.config.metrics_port is not None:
            self._metrics_port = serve_metrics(self.config.metrics_port, self.config.host, REGISTRY, self.config.tls)
        load_decoders()  # the first search or Check with a photo would pay PIL's plugin imports
        await self.rollouts.start()
        await self.routes.start()
        await self.guard.start()
        self._renewals = asyncio.create_task(self.channels.follow_renewals())
        self.jobs.start()
        log.info("gateway routes from registry %s%s", self.config.registry.http_addr,
                 " (stale)" if self.routes.stale else "")  # fmt: skip

    def instance(self, port: int) -> ServiceInstance:
        cfg = self.config
        address = cfg.advertise_address or cfg.host
        meta = {"model": "gateway", "version": "1", "role": "gateway", **hedge_meta(cfg)}
        if self._metrics_port is not None:
            meta[METRICS_PORT_META] = str(self._metrics_port)
        return ServiceInstance(
            name=SERVICE_NAMES["gateway"], instance_id=f"{SERVICE_NAMES['gateway']}-{address}-{port}",
            address=address, port=port, meta=meta,
            check_interval_s=cfg.check_interval_s, check_timeout_s=cfg.check_interval_s,
            grpc_health_service="",  # the whole server: SERVING while a flow can be served
        )  # fmt: skip

    def begin_draining(self) -> None:
        """Searches already running finish within the grace period; grpc refuses new ones."""

    def in_flight(self) -> int:
        return 0  # the server's own stop(grace) waits for running searches

    def watch_readiness(self, report: Callable[[str, bool], None]) -> None:
        """Health follows what each flow can serve: PhotoSearch the route table, ListingGuard its
        listing routes and policy, Jobs whether the queue was reached; the whole server ("", also
        the gateway's Consul check) is SERVING while either synchronous flow can be served."""
        flows = {PHOTO_SEARCH: False, LISTING_GUARD_SERVICE: False}

        def flow(name: str) -> Callable[[bool], None]:
            def told(ready: bool) -> None:
                flows[name] = ready
                report(name, ready)
                report("", any(flows.values()))

            return told

        self.routes.watch_readiness(flow(PHOTO_SEARCH))
        self._following = asyncio.create_task(self.guard.follow_readiness(flow(LISTING_GUARD_SERVICE)))
        self.jobs.watch_ready(lambda reachable: report(JOBS, reachable))

    def _photo_defaults(self, defaults: PhotoSearchDefaults) -> None:
        # Live from KV (meshserve/config/photo-search): what a search without top_k/min score gets.
        self.search.config = replace(self.search.config, default_top_k=defaults.top_k,
                                     default_min_score=defaults.min_detection_score)

    async def close(self) -> None:
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)
        await self.guard.close()
        await self.jobs.close()
        await self.shadows.close()
        await self.rollouts.stop()
        await self.routes.close()
        await self.admission.close()
        if self._renewals is not None:
            self._renewals.cancel()
            await asyncio.gather(self._renewals, return_exceptions=True)


# Label children looked up once per label set, not per call.
_requests = functools.cache(REQUESTS.labels)
_latency = functools.cache(LATENCY.labels)


def observe_request(method: str, code: str, seconds: float) -> None:
    """Called inside the call's trace context: the latency carries its trace id as an exemplar."""
    _requests(method, code).inc()
    trace_id = telemetry.trace_id_of()
    _latency(method).observe(seconds, {"trace_id": trace_id} if trace_id else None)


async def run_gateway(config: GatewayConfig) -> int:
    process = ProcessConfig(
        service_name=SERVICE_NAMES["gateway"], host=config.host, port=config.port,
        max_message_bytes=config.max_message_bytes, grace_s=config.grace_s,
        registry=config.registry if config.register else None, port_file=config.port_file,
        trace_file=config.trace_file, tls=config.tls,
    )  # fmt: skip
    return await GrpcProcess(Gateway(config), process, observe_request).run()
