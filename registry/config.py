"""What the registry client needs to know: where Consul is and what to register."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_CONSUL_HTTP_ADDR = "http://127.0.0.1:8500"

# (contract) service names, listed in docs/architecture.md
SERVICE_NAMES = {
    "detector": "meshserve-detector",
    "embedder": "meshserve-embedder",
    "indexer": "meshserve-indexer",
    "classifier": "meshserve-classifier",
    "shipping": "meshserve-shipping",
    "gateway": "meshserve-gateway",
}

# Meta key of every server serving /metrics: the port Prometheus and `meshserve top` scrape
# (the registered address, this port, /metrics).
METRICS_PORT_META = "metrics_port"


@dataclass(frozen=True)
class RegistryConfig:
    """Where Consul listens. Built from Consul's own variables, like the consul CLI."""

    http_addr: str = DEFAULT_CONSUL_HTTP_ADDR
    token: str | None = None
    # Deadline of every non-blocking request to Consul (blocking queries add their wait).
    request_timeout_s: float = 5.0

    @classmethod
    def from_env(cls, http_addr: str | None = None, token: str | None = None) -> RegistryConfig:
        addr = http_addr or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_CONSUL_HTTP_ADDR
        if "://" not in addr:
            addr = "http://" + addr
        parts = urlsplit(addr)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"CONSUL_HTTP_ADDR {addr!r} is not an http(s)://host:port address; "
                "set it like http://127.0.0.1:8500"
            )
        return cls(http_addr=addr, token=token or os.environ.get("CONSUL_HTTP_TOKEN") or None)

    def __post_init__(self) -> None:
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")

    @property
    def scheme(self) -> str:
        return urlsplit(self.http_addr).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.http_addr).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.http_addr)
        return parts.port or (443 if parts.scheme == "https" else 8500)


@dataclass(frozen=True)
class ServiceInstance:
    """One replica as it is registered: a gRPC server with meta and a gRPC health check."""

    name: str  # e.g. "meshserve-embedder"
    instance_id: str  # unique per replica, e.g. "meshserve-embedder-127.0.0.1-50051"
    address: str
    port: int
    meta: dict[str, str] = field(default_factory=dict)  # model, version, role (+ shard meta)
    tags: tuple[str, ...] = ()
    check_interval_s: float = 1.0
    check_timeout_s: float = 1.0
    deregister_critical_after_s: float = 60.0
    grpc_health_service: str = ""  # "" checks the whole server
    tls_server_name: str = ""  # set: the gRPC check uses TLS (GRPCUseTLS) and verifies this name (TLSServerName)
