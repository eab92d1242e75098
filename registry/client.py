"""Registering meshserve servers in Consul, one-shot discovery reads, and KV helpers."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import consul

from meshserve.errors import InvalidInput
from meshserve.registry.config import SERVICE_NAMES, RegistryConfig, ServiceInstance
from meshserve.registry.consul_http import AsyncConsul, open_consul, translate_errors
from meshserve.registry.instances import Instance, instances_from_health

log = logging.getLogger(__name__)

T = TypeVar("T")

# (contract) meta every meshserve server carries, and what indexers add (docs/architecture.md).
REQUIRED_META = ("model", "version", "role")
INDEXER_META = ("index", "shard", "embedder_version", "dim", "count", "metric", "generation")
MAX_CHECK_INTERVAL_S = 2.0

# Consul's own limits on service meta (docs: "Services" → Meta).
_META_MAX_PAIRS = 64
_META_MAX_KEY = 128
_META_MAX_VALUE = 512
_META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_ID_RE = re.compile(r"^[^/?#\s]+$")


def go_duration(seconds: float) -> str:
    """Seconds → a Go duration string Consul parses ("2s", "1500ms")."""
    millis = max(1, round(seconds * 1000))
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def validate_instance(instance: ServiceInstance) -> None:
    """Reject what Consul would refuse or what breaks the mesh contract, saying what to fix."""
    problems: list[str] = []
    if not instance.name:
        problems.append("name is empty")
    if not _ID_RE.match(instance.instance_id or ""):
        problems.append(
            f"instance_id {instance.instance_id!r} is empty or has '/', '?', '#' or spaces"
        )
    if not instance.address:
        problems.append("address is empty (the gRPC check and clients need a routable host)")
    if not 0 < instance.port < 65536:
        problems.append(f"port {instance.port} is not in 1..65535")
    if not 0 < instance.check_interval_s <= MAX_CHECK_INTERVAL_S:
        problems.append(
            f"check_interval_s {instance.check_interval_s} is not in (0, {MAX_CHECK_INTERVAL_S}]"
        )
    if not instance.check_timeout_s > 0:
        problems.append(f"check_timeout_s {instance.check_timeout_s} must be > 0")
    if not instance.deregister_critical_after_s > 0:
        problems.append(
            f"deregister_critical_after_s {instance.deregister_critical_after_s} must be > 0"
        )
    problems += _meta_problems(instance.meta)
    if instance.name in SERVICE_NAMES.values():
        wanted = REQUIRED_META + (INDEXER_META if instance.name == SERVICE_NAMES["indexer"] else ())
        missing = [k for k in wanted if not instance.meta.get(k)]
        if missing:
            problems.append(f"{instance.name} must carry meta {', '.join(missing)}")
    if problems:
        raise InvalidInput(f"cannot register {instance.instance_id!r}: " + "; ".join(problems))


def _meta_problems(meta: Mapping[str, str]) -> list[str]:
    problems = []
    if len(meta) > _META_MAX_PAIRS:
        problems.append(f"meta has {len(meta)} pairs, Consul allows {_META_MAX_PAIRS}")
    for key, value in meta.items():
        if not isinstance(key, str) or not _META_KEY_RE.match(key):
            problems.append(f"meta key {key!r} must be letters, digits, '-' or '_'")
        elif len(key) > _META_MAX_KEY:
            problems.append(f"meta key {key[:20]!r}… is longer than {_META_MAX_KEY}")
        elif key.startswith("consul-"):
            problems.append(f"meta key {key!r} uses Consul's reserved 'consul-' prefix")
        if not isinstance(value, str):
            problems.append(f"meta {key!r} must be a string, got {type(value).__name__}")
        elif len(value) > _META_MAX_VALUE:
            problems.append(f"meta {key!r} is longer than {_META_MAX_VALUE} characters")
    return problems


def grpc_check(instance: ServiceInstance) -> dict[str, Any]:
    """The Consul gRPC health check of one instance (health service after the '/')."""
    target = f"{instance.address}:{instance.port}"
    if ":" in instance.address:
        target = f"[{instance.address}]:{instance.port}"
    if instance.grpc_health_service:
        target += "/" + instance.grpc_health_service
    check = consul.Check.grpc(
        target,
        go_duration(instance.check_interval_s),
        timeout=go_duration(instance.check_timeout_s),
        deregister=go_duration(instance.deregister_critical_after_s),
    )
    check["Name"] = f"gRPC health of {instance.instance_id}"
    if instance.tls_server_name:
        check.update(GRPCUseTLS=True, TLSServerName=instance.tls_server_name)
    return check


class RegistryClient:
    """One py-consul asyncio session for a run of registry calls; `async with` it."""

    def __init__(self, config: RegistryConfig):
        self.config = config
        self._consul: AsyncConsul | None = None

    async def __aenter__(self) -> RegistryClient:
        self._consul = open_consul(self.config)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._consul is not None:
            await self._consul.close()
            self._consul = None

    @property
    def consul(self) -> AsyncConsul:
        if self._consul is None:
            raise RuntimeError("RegistryClient used outside `async with`")
        return self._consul

    async def call(self, action: str, call: Awaitable[T]) -> T:
        """Await any py-consul call on `self.consul` with the config's deadline and errors
        translated, e.g. `await client.call("read x", client.consul.health.service("x"))`."""
        with translate_errors(action, self.config):
            return await asyncio.wait_for(call, self.config.request_timeout_s)

    _call = call

    async def register(self, instance: ServiceInstance) -> None:
        """Register (or re-register, replacing its checks) one instance with a gRPC check."""
        validate_instance(instance)
        ok = await self._call(
            f"register {instance.instance_id}",
            self.consul.agent.service.register(
                instance.name,
                service_id=instance.instance_id,
                address=instance.address,
                port=instance.port,
                tags=list(instance.tags) or None,
                meta=dict(instance.meta) or None,
                check=grpc_check(instance),
                replace_existing_checks=True,
            ),
        )
        if not ok:
            raise InvalidInput(f"register {instance.instance_id}: Consul did not accept it")
        log.info(
            "registered %s (%s at %s:%s)",
            instance.instance_id,
            instance.name,
            instance.address,
            instance.port,
        )

    async def deregister(self, instance_id: str) -> None:
        """Remove an instance and its checks; an instance already gone is not an error."""
        if not _ID_RE.match(instance_id or ""):
            raise InvalidInput(f"deregister: instance id {instance_id!r} is not a valid id")
        ok = await self._call(
            f"deregister {instance_id}", self.consul.agent.service.deregister(instance_id)
        )
        if ok:
            log.info("deregistered %s", instance_id)
        else:
            log.info("deregister %s: Consul does not know it (already gone)", instance_id)

    async def passing(self, service: str) -> tuple[Instance, ...]:
        """The passing instances of `service` right now (one non-blocking read)."""
        _, entries = await self._call(
            f"read passing {service}", self.consul.health.service(service, passing=True)
        )
        return instances_from_health(entries)

    async def kv_get(self, key: str) -> str | None:
        """The value at `key` as text, or None when the key does not exist."""
        _check_key(key)
        _, item = await self._call(f"kv get {key}", self.consul.kv.get(key))
        if item is None:
            return None
        return _text(item.get("Value"))

    async def kv_get_prefix(self, prefix: str) -> dict[str, str]:
        """Every key under `prefix` → its value as text ({} when there is none)."""
        _check_key(prefix, allow_empty=True)
        _, items = await self._call(f"kv get {prefix}*", self.consul.kv.get(prefix, recurse=True))
        return kv_items_to_dict(items)

    async def kv_put(self, key: str, value: str | bytes) -> None:
        _check_key(key)
        if not isinstance(value, (str, bytes)):
            raise InvalidInput(
                f"kv put {key}: value must be str or bytes, got {type(value).__name__}"
            )
        ok = await self._call(f"kv put {key}", self.consul.kv.put(key, value))
        if not ok:
            raise InvalidInput(f"kv put {key}: Consul answered false")

    async def kv_delete(self, key: str) -> None:
        _check_key(key)
        await self._call(f"kv delete {key}", self.consul.kv.delete(key))

    async def kv_delete_prefix(self, prefix: str) -> None:
        # An empty prefix would wipe the whole KV store; nobody in the mesh needs that.
        _check_key(prefix)
        await self._call(f"kv delete {prefix}*", self.consul.kv.delete(prefix, recurse=True))


def _check_key(key: str, allow_empty: bool = False) -> None:
    if not isinstance(key, str) or (not key and not allow_empty) or key.startswith("/"):
        raise InvalidInput(f"KV key {key!r} must be a non-empty string not starting with '/'")


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def kv_items_to_dict(items: list[Mapping[str, Any]] | None) -> dict[str, str]:
    """py-consul's recurse answer (Values already base64-decoded) → key → text."""
    return {str(item["Key"]): _text(item.get("Value")) for item in items or ()}


# --- the module-level API the rest of meshserve calls ------------------------------------


async def register(config: RegistryConfig, instance: ServiceInstance) -> None:
    """Register `instance` with its gRPC check in the Consul at `config`."""
    async with RegistryClient(config) as client:
        await client.register(instance)


async def deregister(config: RegistryConfig, instance_id: str) -> None:
    """Deregister `instance_id` (and its checks) from the Consul at `config`."""
    async with RegistryClient(config) as client:
        await client.deregister(instance_id)


async def passing_instances(config: RegistryConfig, service: str) -> tuple[Instance, ...]:
    async with RegistryClient(config) as client:
        return await client.passing(service)


async def kv_get(config: RegistryConfig, key: str) -> str | None:
    async with RegistryClient(config) as client:
        return await client.kv_get(key)


async def kv_get_prefix(config: RegistryConfig, prefix: str) -> dict[str, str]:
    async with RegistryClient(config) as client:
        return await client.kv_get_prefix(prefix)


async def kv_put(config: RegistryConfig, key: str, value: str | bytes) -> None:
    async with RegistryClient(config) as client:
        await client.kv_put(key, value)


async def kv_delete(config: RegistryConfig, key: str) -> None:
    async with RegistryClient(config) as client:
        await client.kv_delete(key)


async def kv_delete_prefix(config: RegistryConfig, prefix: str) -> None:
    async with RegistryClient(config) as client:
        await client.kv_delete_prefix(prefix)
