"""Consul's JSON shapes for the dev agent's state (agent, health, catalog and KV answers)."""

from __future__ import annotations

import base64
from typing import Any

from meshserve.registry.dev.schema import format_go_duration
from meshserve.registry.dev.state import CheckState, HealthEntry, KVEntry, NodeInfo, ServiceState

_CHECK_TYPES = {"serf": "", "maintenance": "", "ttl": "ttl", "http": "http", "grpc": "grpc",
                "tcp": "tcp"}


def _dur(seconds: float) -> str:
    return format_go_duration(seconds) if seconds else ""


def node_json(node: NodeInfo) -> dict[str, Any]:
    return {
        "ID": node.node_id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": {"lan": node.address, "lan_ipv4": node.address,
                            "wan": node.address, "wan_ipv4": node.address},
        "Meta": {"consul-network-segment": "", "consul-version": "1.20.0"},
        "CreateIndex": 1,
        "ModifyIndex": 1,
    }


def _service_fields(svc: ServiceState) -> dict[str, Any]:
    d = svc.definition
    out: dict[str, Any] = {
        "ID": d.service_id,
        "Service": d.name,
        "Tags": list(d.tags),
        "Address": d.address,
        "Meta": dict(d.meta),
        "Port": d.port,
        "Weights": dict(d.weights),
        "EnableTagOverride": d.enable_tag_override,
    }
    if d.tagged_addresses:
        out["TaggedAddresses"] = d.tagged_addresses
    if d.socket_path:
        out["SocketPath"] = d.socket_path
    return out


def agent_service_json(svc: ServiceState, datacenter: str) -> dict[str, Any]:
    out = _service_fields(svc)
    out["Datacenter"] = datacenter
    return out


def health_service_json(svc: ServiceState) -> dict[str, Any]:
    out = _service_fields(svc)
    out["Proxy"] = {"Mode": "", "MeshGateway": {}, "Expose": {}}
    out["Connect"] = {}
    out["PeerName"] = ""
    out["CreateIndex"] = svc.create_index
    out["ModifyIndex"] = svc.modify_index
    return out


def check_json(check: CheckState, node: NodeInfo, services: dict[str, ServiceState],
               indexes: bool = True) -> dict[str, Any]:
    d = check.definition
    svc = services.get(d.service_id)
    definition: dict[str, Any] = {}
    if d.kind in ("http", "grpc", "tcp"):
        definition = {"Interval": _dur(d.interval), "Timeout": _dur(d.timeout)}
        definition[{"http": "HTTP", "grpc": "GRPC", "tcp": "TCP"}[d.kind]] = d.target
        if d.kind == "http":
            definition.update(Header=d.header, Method=d.method, Body=d.body)
        if d.kind == "grpc":
            definition["GRPCUseTLS"] = d.use_tls
        definition["TLSSkipVerify"] = d.tls_skip_verify
        definition["TLSServerName"] = d.tls_server_name
    if d.deregister_after:
        definition["DeregisterCriticalServiceAfter"] = _dur(d.deregister_after)
    out: dict[str, Any] = {
        "Node": node.name,
        "CheckID": d.check_id,
        "Name": d.name,
        "Status": check.status,
        "Notes": d.notes,
        "Output": check.output,
        "ServiceID": d.service_id,
        "ServiceName": svc.definition.name if svc else "",
        "ServiceTags": list(svc.definition.tags) if svc else [],
        "Type": _CHECK_TYPES.get(d.kind, d.kind),
        "Interval": _dur(d.interval),
        "Timeout": _dur(d.timeout),
        "ExposedPort": 0,
        "Definition": definition,
    }
    if indexes:
        out["CreateIndex"] = check.create_index
        out["ModifyIndex"] = check.modify_index
    return out


def health_entry_json(entry: HealthEntry, node: NodeInfo,
                      services: dict[str, ServiceState]) -> dict[str, Any]:
    return {
        "Node": node_json(node),
        "Service": health_service_json(entry.service),
        "Checks": [check_json(c, node, services) for c in entry.checks],
    }


def catalog_service_json(svc: ServiceState, node: NodeInfo) -> dict[str, Any]:
    d = svc.definition
    return {
        "ID": node.node_id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": node_json(node)["TaggedAddresses"],
        "NodeMeta": node_json(node)["Meta"],
        "ServiceKind": "",
        "ServiceID": d.service_id,
        "ServiceName": d.name,
        "ServiceTags": list(d.tags),
        "ServiceAddress": d.address,
        "ServiceTaggedAddresses": d.tagged_addresses or {},
        "ServiceWeights": dict(d.weights),
        "ServiceMeta": dict(d.meta),
        "ServicePort": d.port,
        "ServiceSocketPath": d.socket_path,
        "ServiceEnableTagOverride": d.enable_tag_override,
        "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
        "ServiceConnect": {},
        "ServicePeerName": "",
        "CreateIndex": svc.create_index,
        "ModifyIndex": svc.modify_index,
    }


def kv_json(entry: KVEntry) -> dict[str, Any]:
    return {
        "LockIndex": 0,
        "Key": entry.key,
        "Flags": entry.flags,
        "Value": None if entry.value is None else base64.b64encode(entry.value).decode(),
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    }
