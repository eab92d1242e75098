"""Prometheus HTTP service discovery computed from the registry: every passing replica's /metrics.

Prometheus's `http_sd_configs` GETs a URL that answers a JSON list of target groups,
`[{"targets": ["host:port"], "labels": {...}}]`. Here every passing replica of every `meshserve-*`
service that registered a metrics port (meta `metrics_port`) becomes one group, labelled with the
registration meta, so the same queries work as with `consul_sd_configs` and the relabelling of
deploy/prometheus/prometheus-consul.yml. Only Consul's HTTP API is used: real Consul and
`meshserve registry dev` alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshserve.errors import MeshError
from meshserve.registry.client import RegistryClient
from meshserve.registry.config import METRICS_PORT_META, METRICS_SCHEME_META, RegistryConfig
from meshserve.registry.instances import Instance

log = logging.getLogger(__name__)

SERVICE_PREFIX = "meshserve-"
# Registration meta copied into target labels (the same names as the consul_sd relabelling).
META_LABELS = ("model", "version", "role", "shard", "embedder_version", "index")
SD_PATH = "/targets"


def target_group(instance: Instance) -> dict[str, Any] | None:
    """One replica as a Prometheus target group, or None when it serves no /metrics."""
    port = instance.meta.get(METRICS_PORT_META, "")
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = f"[{instance.address}]" if ":" in instance.address else instance.address
    labels = {"service": instance.name, "instance_id": instance.id}
    labels.update({key: instance.meta[key] for key in META_LABELS if instance.meta.get(key)})
    if instance.meta.get(METRICS_SCHEME_META) == "https":  # mTLS: the scrape job holds the client certificate
        labels["__scheme__"] = "https"
    return {"targets": [f"{host}:{port}"], "labels": labels}


def target_groups(instances: Iterable[Instance]) -> list[dict[str, Any]]:
    """Target groups of `instances` that serve /metrics, in a stable order (by instance id).

    A process that registers several instances (an indexer serving several shards) has one /metrics:
    its registrations become one group, so Prometheus scrapes it once and sums count it once. A
    label its registrations disagree on (shard, instance_id) holds their values, sorted, joined by ","."""
    by_target: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for instance in sorted(instances, key=lambda i: (i.name, i.id)):
        group = target_group(instance)
        if group is not None:
            scrape = (group["labels"].get("__scheme__", "http"), group["targets"][0])
            by_target.setdefault(scrape, []).append(group)
    return [_merged(groups) for groups in by_target.values()]


def _merged(groups: list[dict[str, Any]]) -> dict[str, Any]:
    if len(groups) == 1:
        return groups[0]
    keys = dict.fromkeys(key for group in groups for key in group["labels"])
    labels = {key: ",".join(sorted({group["labels"][key] for group in groups if key in group["labels"]}))
              for key in keys}  # fmt: skip
    return {"targets": groups[0]["targets"], "labels": labels}


async def mesh_services(client: RegistryClient, prefix: str = SERVICE_PREFIX) -> list[str]:
    """Names of the registered services that belong to the mesh."""
    _, services = await client.call("list services", client.consul.catalog.services())
    return sorted(name for name in services or {} if name.startswith(prefix))


async def discover(client: RegistryClient, prefix: str = SERVICE_PREFIX) -> list[dict[str, Any]]:
    """The target groups of every passing replica of every mesh service, right now."""
    names = await mesh_services(client, prefix)
    passing = await asyncio.gather(*(client.passing(name) for name in names))
    return target_groups(i for instances in passing for i in instances)


@dataclass(frozen=True)
class SDServerConfig:
    registry: RegistryConfig
    host: str = "127.0.0.1"
    port: int = 9091  # 0: any free port (written to port_file)
    port_file: Path | None = None
    prefix: str = SERVICE_PREFIX


async def serve_sd(config: SDServerConfig, stop: asyncio.Event) -> None:
    """Answer GET /targets with the registry's target groups until `stop` is set.

    When Consul does not answer, the reply is 503: Prometheus then keeps the targets it last
    discovered instead of dropping every one of them, as the gateway keeps its routes."""
    from aiohttp import web

    async with RegistryClient(config.registry) as client:

        async def targets(request: web.Request) -> web.Response:
            try:
                groups = await discover(client, config.prefix)
            except MeshError as exc:
                log.warning("service discovery failed: %s", exc)
                return web.Response(status=503, text=f"registry unavailable: {exc}\n")
            if service := request.query.get("service"):  # one service's replicas: its scrape job knows its TLS name
                groups = [g for g in groups if g["labels"]["service"] == service]
            return web.Response(text=json.dumps(groups), content_type="application/json")

        async def healthy(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        app = web.Application()
        app.router.add_get(SD_PATH, targets)
        app.router.add_get("/healthz", healthy)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        try:
            port = runner.addresses[0][1]
            log.info("Prometheus service discovery on http://%s:%d%s from %s", config.host, port, SD_PATH,
                     config.registry.http_addr)  # fmt: skip
            if config.port_file is not None:
                config.port_file.write_text(f"{port}\n")
            await stop.wait()
        finally:
            await runner.cleanup()
