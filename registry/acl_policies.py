"""The registry ACL policy each mesh workload needs (Consul rules): each may do only its own job."""

from __future__ import annotations

from meshserve.registry.config import SERVICE_NAMES

# KV prefixes the operator commands write: `meshserve config set` and `meshserve rollout ...`.
CONFIG_PREFIX = "meshserve/config/"
ROLLOUT_PREFIX = "meshserve/rollout/"
# `meshserve shard retire` marks a shard here; its indexers read it before registering again.
RETIRED_SHARDS_PREFIX = "meshserve/shards/retired/"
NATS_SERVICE = "meshserve-nats"
WORKER_SERVICE = "meshserve-worker"

# Reading the mesh: health entries need service:read and node:read (Consul filters on both).
_READ_MESH = ('service_prefix "meshserve-" { policy = "read" }\n'
              'node_prefix "" { policy = "read" }\n')


def _write_service(name: str) -> str:
    return f'service "{name}" {{ policy = "write" }}\n'


def server_rules(service: str) -> str:
    """A model server: registers, re-registers and deregisters its own service name, nothing else;
    an indexer also reads which shards were retired."""
    rules = _write_service(service)
    if service == SERVICE_NAMES["indexer"]:
        rules += f'key_prefix "{RETIRED_SHARDS_PREFIX}" {{ policy = "read" }}\n'
    return rules


def gateway_rules() -> str:
    """The gateway: registers itself; reads replicas and the flows' KV (config, rollouts)."""
    return (_write_service(SERVICE_NAMES["gateway"]) + _READ_MESH +
            'key_prefix "meshserve/" { policy = "read" }\n')


def queue_rules() -> str:
    """`meshserve nats dev`: registers the job queue."""
    return _write_service(NATS_SERVICE)


def worker_rules() -> str:
    """A job worker: registers its metrics port, finds the gateways and the queue."""
    return _write_service(WORKER_SERVICE) + _READ_MESH


def reader_rules() -> str:
    """Read-only: discovery for Prometheus, `top`, `search`, `status`."""
    return _READ_MESH + 'key_prefix "meshserve/" { policy = "read" }\nagent_prefix "" { policy = "read" }\n'


def operator_rules() -> str:
    """The operator's commands: read the mesh, write its live config and rollouts, publish/retire shards."""
    return (reader_rules() + f'key_prefix "{CONFIG_PREFIX}" {{ policy = "write" }}\n'
            f'key_prefix "{ROLLOUT_PREFIX}" {{ policy = "write" }}\n'
            f'key_prefix "{RETIRED_SHARDS_PREFIX}" {{ policy = "write" }}\n' + _write_service(SERVICE_NAMES["indexer"]))


def workload_policies() -> dict[str, str]:
    """Policy name → rules for every workload of a mesh (names as `meshserve up` creates them)."""
    policies = {f"meshserve-{role}": server_rules(name)
                for role, name in SERVICE_NAMES.items() if role != "gateway"}
    policies.update({"meshserve-gateway": gateway_rules(), "meshserve-nats": queue_rules(),
                     "meshserve-worker": worker_rules(), "meshserve-reader": reader_rules(),
                     "meshserve-operator": operator_rules()})
    return policies
