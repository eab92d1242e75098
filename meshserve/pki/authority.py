"""Create the mesh CA and issue leaf certificates signed by it (ECDSA P-256, SPIFFE URI SANs)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshserve.pki.layout import PkiLayout, agent_uri, check_name, client_uri, service_uri, write_private

CA_DAYS = 3650
LEAF_HOURS = 24.0  # short-lived: renewed by re-issuing, picked up by servers and new channels without restarts
_SKEW = timedelta(minutes=5)  # clocks of the hosts in a mesh disagree a little


@dataclass(frozen=True)
class LeafSpec:
    """What a leaf certificate says: its file name, identity URI and the names a TLS peer may verify."""

    name: str
    uris: tuple[str, ...]
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    hours: float = LEAF_HOURS
    # for tests of refusal: a certificate whose validity ended `hours` ago
    expired: bool = False

    def __post_init__(self) -> None:
        check_name(self.name)
        if not self.uris:
            raise ValueError(f"certificate {self.name!r} needs an identity URI")
        if self.hours <= 0:
            raise ValueError(f"validity must be positive hours, not {self.hours}")
        for ip in self.ips:
            ipaddress.ip_address(ip)  # ValueError naming the bad address


def service_leaf(service: str, *, hours: float = LEAF_HOURS, dns: tuple[str, ...] = (),
                 ips: tuple[str, ...] = ()) -> LeafSpec:  # fmt: skip
    """A replica of `service`: identity spiffe://meshserve/service/<service>, and the service name as a DNS SAN
    so a client verifying the server name `<service>` accepts this service's certificate and no other."""
    return LeafSpec(name=service, uris=(service_uri(service),), dns=(service, *dns), ips=ips, hours=hours)


def agent_leaf(name: str = "agent", *, hours: float = LEAF_HOURS, dns: tuple[str, ...] = (),
               ips: tuple[str, ...] = ()) -> LeafSpec:  # fmt: skip
    """A registry agent reached at localhost / 127.0.0.1 (HTTPS server and gRPC check client)."""
    return LeafSpec(name=name, uris=(agent_uri(name),), dns=("localhost", *dns), ips=("127.0.0.1", "::1", *ips),
                    hours=hours)  # fmt: skip


def client_leaf(name: str = "cli", *, hours: float = LEAF_HOURS) -> LeafSpec:
    """A command-line caller: a client identity and no server names."""
    return LeafSpec(name=name, uris=(client_uri(name),), hours=hours)


def _now() -> datetime:
    return datetime.now(UTC)


def init_ca(layout: PkiLayout, *, days: int = CA_DAYS, force: bool = False) -> bool:
    """Create ca.key + ca.crt under layout.root; an existing CA is kept unless `force`. True when created."""
    if layout.has_ca() and not force:
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshserve"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "meshserve mesh CA")])  # fmt: skip
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False),
                       critical=True)  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.root.chmod(0o700)
    write_private(layout.ca_key, _key_pem(key))
    write_private(layout.ca_cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return True


def load_ca(layout: PkiLayout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not layout.has_ca():
        raise FileNotFoundError(f"no mesh CA under {layout.root}: run `meshserve certs init` first")
    cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{layout.ca_key} is not an EC key")
    return cert, key


def issue(layout: PkiLayout, spec: LeafSpec) -> tuple[bytes, bytes]:
    """Sign a fresh key pair for `spec` and write certs/<name>.crt + .key (0600); an existing pair is replaced
    atomically file by file. Returns (certificate PEM, key PEM)."""
    ca_cert, ca_key = load_ca(layout)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    life = timedelta(hours=spec.hours)
    not_before, not_after = (now - 2 * life, now - life) if spec.expired else (now - _SKEW, now + life)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in spec.uris]
    sans += [x509.DNSName(d) for d in spec.dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in spec.ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshserve"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, spec.name)]))  # fmt: skip
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False),
                       critical=True)  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)  # fmt: skip
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_pem, key_pem = cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
    # key first: a reader that sees the new key with the old certificate notices the mismatch and reads again
    write_private(layout.key(spec.name), key_pem)
    write_private(layout.cert(spec.name), cert_pem, mode=0o644)
    return cert_pem, key_pem


def needs_renewal(layout: PkiLayout, name: str, *, fraction: float = 2 / 3) -> bool:
    """True when certs/<name>.crt is missing or has used up `fraction` of its validity."""
    if not layout.has_leaf(name):
        return True
    cert = x509.load_pem_x509_certificate(layout.cert(name).read_bytes())
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return _now() >= start + (end - start) * fraction


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip
