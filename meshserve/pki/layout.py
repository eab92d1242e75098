"""Where the mesh CA keeps its files, and the identities (SPIFFE URIs, DNS names) it puts in certificates."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

TRUST_DOMAIN = "meshserve"
CLIENT_CERT_NAME = "cli"  # the local mesh's certificate for command-line callers: certs/cli.*
# Written by `meshserve up --insecure`: the local mesh runs plaintext, so commands do not offer TLS to it.
INSECURE_MARKER = "insecure-mesh"
# Written by a secure `meshserve up`: its registry's https:// URL, which commands reach with ca.crt and certs/cli.*
LOCAL_REGISTRY_FILE = "registry"
# A leaf's name becomes a file name and, for services, a DNS SAN: keep it a DNS label.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(name: str) -> str:
    """A certificate or service name: lowercase letters, digits and '-', 1..63 long (a DNS label)."""
    if not _NAME.match(name):
        raise ValueError(f"bad name {name!r}: use lowercase letters, digits and '-' (a DNS label, ≤ 63 characters)")
    return name


def service_uri(service: str) -> str:
    """The workload identity of a service replica, e.g. spiffe://meshserve/service/meshserve-detector."""
    return f"spiffe://{TRUST_DOMAIN}/service/{check_name(service)}"


def agent_uri(name: str) -> str:
    """The identity of a registry agent (the dev agent's HTTPS server and its gRPC check client)."""
    return f"spiffe://{TRUST_DOMAIN}/agent/{check_name(name)}"


def client_uri(name: str) -> str:
    """The identity of a command-line caller (search, status, guard, jobs)."""
    return f"spiffe://{TRUST_DOMAIN}/client/{check_name(name)}"


def service_of(uri: str) -> str | None:
    """spiffe://meshserve/service/<name> → <name>; None for any other identity."""
    prefix = f"spiffe://{TRUST_DOMAIN}/service/"
    return uri[len(prefix):] if uri.startswith(prefix) else None


def default_pki_dir(home: Path | None = None) -> Path:
    """$MESHSERVE_HOME/pki (MESHSERVE_HOME defaults to ~/.cache/meshserve)."""
    if home is None:
        env = os.environ.get("MESHSERVE_HOME", "").strip()
        home = Path(env).expanduser() if env else Path.home() / ".cache" / "meshserve"
    return home / "pki"


@dataclass(frozen=True)
class PkiLayout:
    """The files of one mesh CA: ca.crt + ca.key at the top, leaves as certs/<name>.crt + .key."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def leaf_dir(self) -> Path:
        return self.root / "certs"

    def cert(self, name: str) -> Path:
        return self.leaf_dir / f"{check_name(name)}.crt"

    def key(self, name: str) -> Path:
        return self.leaf_dir / f"{check_name(name)}.key"

    @property
    def local_registry(self) -> Path:
        return self.root / LOCAL_REGISTRY_FILE

    def has_ca(self) -> bool:
        return self.ca_cert.is_file() and self.ca_key.is_file()

    def has_leaf(self, name: str) -> bool:
        return self.cert(name).is_file() and self.key(name).is_file()

    def leaf_names(self) -> list[str]:
        if not self.leaf_dir.is_dir():
            return []
        return sorted(p.stem for p in self.leaf_dir.glob("*.crt") if (self.leaf_dir / f"{p.stem}.key").is_file())


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write through a temporary file and rename, so a reader sees the old or the new file, never half of one;
    the file is created with `mode` (keys 0600) rather than chmod-ed after the fact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
