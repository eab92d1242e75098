"""The gateway's ListingGuard service assembled: listing routes, live flow policies, the flow, its
servicer, and a health status for the service that follows whether the flow can be served."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc

from meshserve.gateway.admission import Admission
from meshserve.gateway.arms import Arms
from meshserve.gateway.balancer import ChannelFactory, insecure_channel
from meshserve.gateway.flow_config import FlowConfigs
from meshserve.gateway.flow_policy import PHOTO_SEARCH, PhotoSearchDefaults
from meshserve.gateway.guard_servicer import ListingGuardServicer
from meshserve.gateway.listing_guard import GuardConfig, ListingGuard
from meshserve.gateway.listing_routes import ListingRoutes
from meshserve.gateway.policy import CallPolicy
from meshserve.gateway.routes import RouteTable
from meshserve.gateway.shadow import ShadowRunner
from meshserve.registry.config import RegistryConfig
from meshserve.registry.watch import WatchConfig
from meshserve.v1 import listing_guard_pb2, listing_guard_pb2_grpc

log = logging.getLogger(__name__)

LISTING_GUARD_SERVICE = listing_guard_pb2.DESCRIPTOR.services_by_name["ListingGuard"].full_name
HEALTH_EVERY_S = 0.25


class GuardService:
    def __init__(
        self,
        registry: RegistryConfig,
        routes: RouteTable,
        policies: dict[str, CallPolicy],
        on_photo_defaults: Callable[[PhotoSearchDefaults], None] | None = None,
        config: GuardConfig | None = None,
        watch_config: WatchConfig | None = None,
        channel_factory: ChannelFactory = insecure_channel,
        admission: Admission | None = None,
        arms: Arms | None = None,
        shadows: ShadowRunner | None = None,
    ):
        self.listing_routes = ListingRoutes(registry, policies, channel_factory, watch_config, admission)
        on_apply = {PHOTO_SEARCH: on_photo_defaults} if on_photo_defaults is not None else {}
        self.configs = FlowConfigs(registry, watch_config, on_apply)
        self.guard = ListingGuard(routes, self.listing_routes, self.configs, config, arms, shadows)

    def add_to_server(self, server: grpc.aio.Server, default_deadline_s: float) -> None:
        servicer = ListingGuardServicer(self.guard, default_deadline_s)
        listing_guard_pb2_grpc.add_ListingGuardServicer_to_server(servicer, server)

    async def start(self) -> None:
        await self.configs.start()
        await self.listing_routes.start()

    async def close(self) -> None:
        await self.configs.stop()
        await self.listing_routes.close()

    async def follow_readiness(self, report: Callable[[bool], None]) -> None:
        """Report whether the listing check can be served, now and whenever that changes."""
        serving: bool | None = None
        while True:
            ok, why = self.guard.servable()
            if ok != serving:
                log.info("ListingGuard %s (%s)", "SERVING" if ok else "NOT_SERVING", why)
                report(ok)
                serving = ok
            await asyncio.sleep(HEALTH_EVERY_S)

    def describe(self) -> dict[str, Any]:
        return {"flows": self.configs.describe(), "listing_routes": self.listing_routes.describe()}
