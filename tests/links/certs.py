"""Test certificates made on the spot (cryptography): a CA, link identities, bad ones."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Identity:
    certificate: Path
    key: Path
    cert: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path, passphrase: bytes | None) -> None:
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )


def make_identity(
    folder: Path,
    name: str,
    *,
    issuer: Identity | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    days: float = 30,
    starts_in_days: float = -1,
    passphrase: bytes | None = None,
    ca: bool = False,
) -> tuple[Identity, ec.EllipticCurvePrivateKey]:
    """A certificate and key in ``folder`` (self-signed unless an issuer is given)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.now(UTC) + timedelta(days=starts_in_days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer.cert.subject if issuer else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    certificate = folder / f"{name}.pem"
    certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / f"{name}.key"
    _write_key(key, key_path, passphrase)
    return Identity(certificate, key_path, cert), key
