"""What discovery hands out: immutable passing instances parsed from Consul health entries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Instance:
    """One passing replica of a service, as Consul's /v1/health/service reports it."""

    id: str
    name: str
    address: str
    port: int
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    tags: tuple[str, ...] = ()
    node: str = ""

    @property
    def target(self) -> str:
        """host:port for a gRPC channel (IPv6 addresses bracketed)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def instance_from_entry(entry: Mapping[str, Any]) -> Instance:
    """One `{Node, Service, Checks}` entry → Instance.

    An empty Service.Address means "the node's address" in Consul, so fall back to it.
    """
    service = entry.get("Service") or {}
    node = entry.get("Node") or {}
    address = service.get("Address") or node.get("Address") or ""
    meta = service.get("Meta") or {}
    return Instance(
        id=str(service.get("ID") or service.get("Service") or ""),
        name=str(service.get("Service") or ""),
        address=str(address),
        port=int(service.get("Port") or 0),
        meta=MappingProxyType({str(k): str(v) for k, v in meta.items()}),
        tags=tuple(str(t) for t in (service.get("Tags") or ())),
        node=str(node.get("Node") or ""),
    )


def instances_from_health(entries: Iterable[Mapping[str, Any]] | None) -> tuple[Instance, ...]:
    """Health entries → instances sorted by id, so equal sets compare equal."""
    parsed = (instance_from_entry(e) for e in entries or ())
    return tuple(sorted(parsed, key=lambda i: (i.id, i.node)))
