"""One process's TLS files: flags and env that name them, the local mesh's, and a consistent read of them.

Every process takes its TLS material as three files, `--tls-ca`, `--tls-cert`, `--tls-key` (or
MESHSERVE_TLS_CA / _CERT / _KEY): all three turn mTLS on, none leaves the process plaintext. A server then
requires a client certificate signed by the CA; a client verifies that the server's certificate names the
service it meant to call (the service name is the TLS server name, a DNS SAN the mesh CA puts in each
service's certificate).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshserve.pki.inspect import key_matches
from meshserve.pki.layout import CLIENT_CERT_NAME, INSECURE_MARKER, PkiLayout, default_pki_dir

ENV_CA, ENV_CERT, ENV_KEY = "MESHSERVE_TLS_CA", "MESHSERVE_TLS_CERT", "MESHSERVE_TLS_KEY"
_READ_ATTEMPTS = 20  # a renewal replaces key and certificate one after the other: read again until they fit


class TlsMaterialError(ValueError):
    """TLS files that are missing, unreadable, or a key that does not belong to its certificate."""


@dataclass(frozen=True)
class TlsMaterial:
    ca: bytes
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class TlsFiles:
    """Where one process's TLS material lives: the mesh CA's certificate, its own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def resolve(cls, ca: Path | str | None = None, cert: Path | str | None = None, key: Path | str | None = None,
                env: Mapping[str, str] | None = None) -> TlsFiles | None:  # fmt: skip
        """From flags, each falling back to its MESHSERVE_TLS_* variable: all three → TlsFiles, none → None
        (plaintext), some → TlsMaterialError saying which are missing."""
        env = os.environ if env is None else env
        given = {"--tls-ca": ca or env.get("MESHSERVE_TLS_CA"), "--tls-cert": cert or env.get("MESHSERVE_TLS_CERT"),
                 "--tls-key": key or env.get("MESHSERVE_TLS_KEY")}  # fmt: skip
        present = {flag: Path(str(value)) for flag, value in given.items() if value}
        if not present:
            return None
        missing = [flag for flag in given if flag not in present]
        if missing:
            raise TlsMaterialError(f"mTLS needs all three of --tls-ca, --tls-cert, --tls-key (or {ENV_CA}, "
                                   f"{ENV_CERT}, {ENV_KEY}); missing {', '.join(missing)}")  # fmt: skip
        return cls(present["--tls-ca"], present["--tls-cert"], present["--tls-key"])

    @classmethod
    def from_pki(cls, layout: PkiLayout, name: str) -> TlsFiles:
        return cls(layout.ca_cert, layout.cert(name), layout.key(name))

    def stamp(self) -> tuple[int, ...]:
        """Changes whenever one of the files is replaced (re-issue writes new files and renames them)."""
        try:
            return tuple(v for p in (self.ca, self.cert, self.key) for v in (p.stat().st_mtime_ns, p.stat().st_ino))
        except OSError:
            return ()

    def read(self) -> TlsMaterial:
        """The three files, with a key that belongs to the certificate (retried across a renewal in progress)."""
        for attempt in range(_READ_ATTEMPTS):
            try:
                material = TlsMaterial(self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes())
            except OSError as exc:
                raise TlsMaterialError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from exc
            if key_matches(material.cert, material.key):
                return material
            time.sleep(0.01 * (attempt + 1))
        raise TlsMaterialError(f"{self.key} is not the key of {self.cert}")


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-ca/--tls-cert/--tls-key on a command that serves or calls gRPC."""
    group = parser.add_argument_group(
        "mutual TLS", "all three turn mTLS on, none keeps the connection plaintext; see `meshserve certs --help`")
    group.add_argument("--tls-ca", type=Path, help=f"mesh CA certificate (default ${ENV_CA})")
    group.add_argument("--tls-cert", type=Path, help=f"this process's certificate (default ${ENV_CERT})")
    group.add_argument("--tls-key", type=Path, help=f"its private key (default ${ENV_KEY})")


def tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    return TlsFiles.resolve(getattr(args, "tls_ca", None), getattr(args, "tls_cert", None),
                            getattr(args, "tls_key", None))  # fmt: skip


def local_client_files(home: Path | None = None) -> TlsFiles | None:
    """The local mesh's client credentials ($MESHSERVE_HOME/pki: ca.crt, certs/cli.crt + cli.key), when
    `meshserve up` made them and the mesh is not running with --insecure."""
    layout = PkiLayout(default_pki_dir(home))
    if not layout.has_ca() or not layout.has_leaf(CLIENT_CERT_NAME) or (layout.root / INSECURE_MARKER).exists():
        return None
    return TlsFiles.from_pki(layout, CLIENT_CERT_NAME)


def client_files(args: argparse.Namespace | None = None) -> TlsFiles | None:
    """A command-line caller's TLS: flags, else MESHSERVE_TLS_*, else the local mesh's, else plaintext.
    MESHSERVE_TLS=off forces plaintext."""
    if os.environ.get("MESHSERVE_TLS", "").lower() in ("off", "0", "false", "no"):
        return None
    explicit = tls_from_args(args) if args is not None else TlsFiles.resolve()
    return explicit or local_client_files()
