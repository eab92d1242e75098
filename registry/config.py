"""What the registry client needs to know: where Consul is and what to register."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from meshserve.pki.layout import CLIENT_CERT_NAME, PkiLayout, default_pki_dir

DEFAULT_CONSUL_HTTP_ADDR = "http://127.0.0.1:8500"
# A local mesh (`meshserve up`) leaves its operator token and its registry's address here; a client of
# that address with no token set uses it (and never sends it anywhere else).
LOCAL_OPERATOR_TOKEN = Path("acl") / "operator.token"
LOCAL_REGISTRY_ADDR = Path("acl") / "registry"

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
# "https" when that port wants a client certificate of the mesh CA (absent: plain http)
METRICS_SCHEME_META = "metrics_scheme"


@dataclass(frozen=True)
class RegistryConfig:
    """Where Consul listens and how to talk to it. Built from Consul's own variables, like the consul CLI."""

    http_addr: str = DEFAULT_CONSUL_HTTP_ADDR
    token: str | None = None
    ca_file: str | None = None  # CONSUL_CACERT: the CA that signed the agent's HTTPS certificate
    cert_file: str | None = None  # CONSUL_CLIENT_CERT / CONSUL_CLIENT_KEY: ours, for verify_incoming
    key_file: str | None = None
    tls_server_name: str | None = None  # CONSUL_TLS_SERVER_NAME: the name to expect in its certificate
    tls_verify: bool = True  # CONSUL_HTTP_SSL_VERIFY=false turns verification off (debugging only)
    # Deadline of every non-blocking request to Consul (blocking queries add their wait).
    request_timeout_s: float = 5.0

    @classmethod
    def from_env(cls, http_addr: str | None = None, token: str | None = None) -> RegistryConfig:
        env = os.environ
        addr = http_addr or env.get("CONSUL_HTTP_ADDR") or DEFAULT_CONSUL_HTTP_ADDR
        ssl = _env_bool("CONSUL_HTTP_SSL")
        if "://" not in addr:
            addr = ("https://" if ssl else "http://") + addr
        elif ssl is not None:  # like the consul CLI: CONSUL_HTTP_SSL decides the scheme
            addr = ("https://" if ssl else "http://") + addr.split("://", 1)[1]
        parts = urlsplit(addr)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"CONSUL_HTTP_ADDR {addr!r} is not an http(s)://host:port address; "
                "set it like http://127.0.0.1:8500"
            )
        ca, cert, key = (env.get(name) or None for name in ("CONSUL_CACERT", "CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY"))
        local = _local_registry_tls(addr) if ssl is None and not (ca or cert or key) else None
        if local is not None:
            addr, ca, cert, key = local
        return cls(http_addr=addr, token=token or _env_token(addr), ca_file=ca, cert_file=cert, key_file=key,
                   tls_server_name=env.get("CONSUL_TLS_SERVER_NAME") or None,
                   tls_verify=_env_bool("CONSUL_HTTP_SSL_VERIFY") is not False)

    def __post_init__(self) -> None:
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY go together: set both or neither")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings for an https:// registry (None for http://)."""
        if self.scheme != "https":
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        if not self.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def server_hostname(self) -> str | None:
        """The name the agent's certificate is checked against, when it is not the address's host."""
        return self.tls_server_name if self.scheme == "https" else None

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


def _env_bool(name: str) -> bool | None:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in ("1", "t", "true", "yes"):
        return True
    if raw in ("0", "f", "false", "no"):
        return False
    raise ValueError(f"{name}={os.environ[name]!r} is not true or false")


def _local_registry_tls(addr: str) -> tuple[str, str, str, str] | None:
    """When `addr` is the HTTPS registry of the local mesh (`meshserve up`, $MESHSERVE_HOME/pki/registry), by
    either scheme: its https:// URL, the mesh CA and the command-line client's certificate and key."""
    layout = PkiLayout(default_pki_dir())
    try:
        local = layout.local_registry.read_text().strip()
    except OSError:  # no secure local mesh
        return None
    if urlsplit(local).netloc != urlsplit(addr).netloc or not layout.has_leaf(CLIENT_CERT_NAME):
        return None
    return local, str(layout.ca_cert), str(layout.cert(CLIENT_CERT_NAME)), str(layout.key(CLIENT_CERT_NAME))


def _env_token(addr: str) -> str | None:
    """CONSUL_HTTP_TOKEN, else the file CONSUL_HTTP_TOKEN_FILE names, else the operator token of the
    local mesh whose registry is `addr`."""
    if os.environ.get("CONSUL_HTTP_TOKEN"):
        return os.environ["CONSUL_HTTP_TOKEN"]
    named = os.environ.get("CONSUL_HTTP_TOKEN_FILE")
    if named:
        try:
            return Path(named).read_text().strip() or None
        except OSError as exc:
            raise ValueError(f"cannot read CONSUL_HTTP_TOKEN_FILE {named}: {exc.strerror}") from None
    home = Path(os.environ.get("MESHSERVE_HOME", "").strip() or Path.home() / ".cache" / "meshserve")
    try:
        if (home / LOCAL_REGISTRY_ADDR).read_text().strip() != addr.rstrip("/"):
            return None
        return (home / LOCAL_OPERATOR_TOKEN).read_text().strip() or None
    except OSError:  # no local mesh with ACLs
        return None


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
