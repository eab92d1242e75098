"""What the dev agent says about itself as Consul's one server: the leader address, its own `consul`
service in the catalog, and the answer of GET /v1/agent/self."""

from __future__ import annotations

import platform
import sys
from typing import TYPE_CHECKING, Any

from meshserve.registry.dev.schema import ServiceDef

if TYPE_CHECKING:
    from meshserve.registry.dev.state import DevState, NodeInfo

VERSION = "1.20.0"
REVISION = "meshserve-dev"
SERVER_RPC_PORT = 8300  # Consul's server RPC port: the leader's address and the `consul` service's port
SERF_LAN_PORT = 8301
CONSUL_SERVICE = "consul"


def leader_addr(node: NodeInfo) -> str:
    """What /v1/status/leader answers and Stats.consul.leader_addr says: this agent is the leader."""
    return f"{node.address}:{SERVER_RPC_PORT}"


def consul_service(node: NodeInfo) -> ServiceDef:
    """Every Consul server appears in the catalog as service `consul` (port 8300, no tags), with only
    the node's serfHealth check; it is not one of the agent's local services."""
    return ServiceDef(
        service_id=CONSUL_SERVICE, name=CONSUL_SERVICE, port=SERVER_RPC_PORT, weights={"Passing": 1, "Warning": 1},
        meta={"non_voter": "false", "raft_version": "3", "read_replica": "false", "serf_protocol_current": "2",
              "serf_protocol_max": "5", "serf_protocol_min": "1", "version": VERSION, "grpc_port": "8502",
              "grpc_tls_port": "8503"},
    )  # fmt: skip


def _strings(values: dict[str, object]) -> dict[str, str]:
    """Consul's Stats are maps of strings, booleans and numbers included."""
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in values.items()}


def agent_self_json(state: DevState, acl_enabled: bool) -> dict[str, Any]:
    """GET /v1/agent/self: Config, DebugConfig, Coord, Member, Stats and Meta, shaped like a Consul
    server's answer (values are this agent's own; fields the dev agent has no notion of are left out
    of DebugConfig rather than invented)."""
    node = state.node
    local_checks = [c for c in state.checks.values() if c.service_id]
    return {
        "Config": {"Datacenter": node.datacenter, "PrimaryDatacenter": node.datacenter, "NodeName": node.name,
                   "NodeID": node.node_id, "Revision": REVISION, "Server": True, "Version": VERSION,
                   "BuildDate": "1970-01-01T00:00:01Z"},
        "DebugConfig": {"Datacenter": node.datacenter, "PrimaryDatacenter": node.datacenter, "NodeName": node.name,
                        "NodeID": node.node_id, "ServerMode": True, "Bootstrap": True, "DevMode": True,
                        "ACLsEnabled": acl_enabled, "AdvertiseAddrLAN": node.address, "Revision": REVISION,
                        "Version": VERSION, "ServerPort": SERVER_RPC_PORT, "SerfPortLAN": SERF_LAN_PORT},
        "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
        "Member": {"Name": node.name, "Addr": node.address, "Port": SERF_LAN_PORT, "Status": 1,
                   "Tags": {"dc": node.datacenter, "role": "consul", "id": node.node_id, "port": str(SERVER_RPC_PORT),
                            "bootstrap": "1", "build": f"{VERSION}:{REVISION}", "vsn": "2", "vsn_min": "2",
                            "vsn_max": "3", "raft_vsn": "3", "segment": ""},
                   "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
                   "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4},
        "Stats": {
            "agent": _strings({"check_monitors": 0, "check_ttls": sum(c.definition.kind == "ttl" for c in local_checks),
                               "checks": len(local_checks), "services": len(state.services)}),
            "build": _strings({"prerelease": "", "revision": REVISION, "version": VERSION, "version_metadata": ""}),
            "consul": _strings({"acl": "enabled" if acl_enabled else "disabled", "bootstrap": True,
                                "known_datacenters": 1, "leader": True, "leader_addr": leader_addr(node),
                                "server": True}),
            "raft": _strings({"state": "Leader", "num_peers": 0, "applied_index": state.index,
                              "commit_index": state.index, "last_log_index": state.index,
                              "protocol_version": 3, "protocol_version_max": 3, "protocol_version_min": 0}),
            "runtime": _strings({"arch": platform.machine(), "os": sys.platform, "version": platform.python_version(),
                                 "cpu_count": _cpu_count()}),
            "serf_lan": _strings({"members": 1, "failed": 0, "left": 0, "health_score": 0}),
            "serf_wan": _strings({"members": 1, "failed": 0, "left": 0, "health_score": 0}),
        },
        "Meta": {"consul-network-segment": "", "consul-version": VERSION},
    }  # fmt: skip


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1
