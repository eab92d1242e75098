"""Read what a certificate says: subject, identity URIs, names, validity, issuer, and whether a key fits it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization


@dataclass(frozen=True)
class CertInfo:
    subject: str
    issuer: str
    uris: tuple[str, ...]
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    is_ca: bool
    sha256: str

    def expires_in_s(self, now: datetime | None = None) -> float:
        return (self.not_after - (now or datetime.now(UTC))).total_seconds()

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(not_before=self.not_before.isoformat(), not_after=self.not_after.isoformat(),
                   uris=list(self.uris), dns=list(self.dns), ips=list(self.ips),
                   expires_in_s=round(self.expires_in_s(), 1))  # fmt: skip
        return out


def describe_pem(pem: bytes) -> CertInfo:
    cert = x509.load_pem_x509_certificate(pem)
    return describe(cert)


def describe(cert: x509.Certificate) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        uris = dns = ips = ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertInfo(subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(), uris=uris, dns=dns,
                    ips=ips, not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, is_ca=is_ca,
                    sha256=cert.fingerprint(hashes.SHA256()).hex())  # fmt: skip


def describe_file(path: Path) -> CertInfo:
    return describe_pem(path.read_bytes())


def key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the private key belongs to the certificate (a renewal caught between its two files does not)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return False
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
