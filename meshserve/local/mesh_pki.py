"""The local mesh's certificates: the CA and one certificate per service under $MESHSERVE_HOME/pki, kept fresh."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from meshserve.pki.authority import (
    LEAF_HOURS,
    LeafSpec,
    agent_leaf,
    client_leaf,
    init_ca,
    issue,
    needs_renewal,
    service_leaf,
)
from meshserve.pki.layout import PkiLayout, default_pki_dir
from meshserve.queue.config import WORKER_SERVICE
from meshserve.registry.config import SERVICE_NAMES
from meshserve.rpc.tls_files import CLIENT_CERT_NAME, ENV_CA, ENV_CERT, ENV_KEY, INSECURE_MARKER

AGENT_CERT_NAME = "agent"
# kind of child (its `meshserve` subcommand role) → the service its certificate names
SERVICES = (*SERVICE_NAMES.values(), WORKER_SERVICE)


@dataclass(frozen=True)
class MeshPki:
    """Where the local mesh's TLS material is, and what each child is given of it."""

    layout: PkiLayout
    hours: float = LEAF_HOURS
    registry_host: str = "127.0.0.1"  # the agent's certificate names it (besides localhost and the loopback IPs)

    @classmethod
    def prepare(cls, home: Path, secure: bool, hours: float = LEAF_HOURS,
                registry_host: str = "127.0.0.1") -> MeshPki | None:  # fmt: skip
        """Secure: create the CA if missing and every certificate that is missing or due for renewal, and let
        the commands find them (search, status, guard, jobs). Insecure: mark the local mesh as plaintext."""
        layout = PkiLayout(default_pki_dir(home))
        layout.root.mkdir(parents=True, exist_ok=True)
        marker = layout.root / INSECURE_MARKER
        layout.local_registry.unlink(missing_ok=True)  # written again once a secure registry starts
        if not secure:
            marker.write_text("`meshserve up --insecure` runs the local mesh without TLS\n")
            return None
        marker.unlink(missing_ok=True)
        init_ca(layout)
        pki = cls(layout, hours, registry_host)
        issue(layout, pki._agent_spec())  # fresh each time: the registry's address may have changed
        pki.renew_due()
        return pki

    def renew_due(self, force: bool = False) -> list[str]:
        """Re-issue the certificates past 2/3 of their life (or missing; every one with `force`); the processes
        pick them up live."""
        specs = [service_leaf(s, hours=self.hours) for s in SERVICES]
        specs += [self._agent_spec(), client_leaf(CLIENT_CERT_NAME, hours=self.hours)]
        renewed = []
        for spec in specs:
            if force or needs_renewal(self.layout, spec.name):
                issue(self.layout, spec)
                renewed.append(spec.name)
        return renewed

    def _agent_spec(self) -> LeafSpec:
        return agent_leaf(AGENT_CERT_NAME, hours=self.hours, **_host_names(self.registry_host))

    def env(self, service: str) -> tuple[tuple[str, str], ...]:
        """MESHSERVE_TLS_* for a child serving as `service`."""
        return ((ENV_CA, str(self.layout.ca_cert)), (ENV_CERT, str(self.layout.cert(service))),
                (ENV_KEY, str(self.layout.key(service))))  # fmt: skip

    def registry_env(self, name: str = CLIENT_CERT_NAME) -> tuple[tuple[str, str], ...]:
        """Consul's client variables for the local HTTPS registry: the mesh CA and certificate `name`."""
        return (("CONSUL_CACERT", str(self.layout.ca_cert)), ("CONSUL_CLIENT_CERT", str(self.layout.cert(name))),
                ("CONSUL_CLIENT_KEY", str(self.layout.key(name))))  # fmt: skip

    def https_registry_args(self, addr: str) -> tuple[str, ...]:
        """The dev agent serving only HTTPS on `addr` (HOST:PORT) and requiring client certificates of the mesh
        CA; commands of this home find it there ($MESHSERVE_HOME/pki/registry)."""
        self.layout.local_registry.write_text(f"https://{addr}\n")
        return ("--https-addr", addr, "--http-addr", "off", "--verify-incoming", *self.agent_args())

    def agent_args(self) -> tuple[str, ...]:
        """The dev agent's flags: the CA to verify check targets and the certificate it presents to them."""
        return ("--ca-file", str(self.layout.ca_cert), "--cert-file", str(self.layout.cert(AGENT_CERT_NAME)),
                "--key-file", str(self.layout.key(AGENT_CERT_NAME)))  # fmt: skip


def _host_names(host: str) -> dict[str, tuple[str, ...]]:
    """`host` as the SAN it is: an IP address or a DNS name (none when the agent leaf has it already)."""
    if host in ("127.0.0.1", "::1", "localhost", ""):
        return {}
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return {"dns": (host,)}
    return {"ips": (host,)}
