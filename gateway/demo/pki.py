"""Throwaway certificates: a CA, the certificates it signs, as PEM files.

The demo makes one CA per country and one certificate per site at every start, in its
temporary directory, gone when it ends: it shows a link authenticated as a real one is
(each side checks the other's certificate against the other agency's CA and name), with
no key worth stealing. The tests and benches make theirs with the same :class:`Authority`
(a wrong CA, an expired certificate or another certificate's key are one call away).
The CA's key stays in memory; it is never written anywhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEMO_DAYS = 2  # the demo's certificates outlive any demo run, and nothing else


@dataclass
class Issued:
    """A certificate and its key as PEM files."""

    certificate: Path
    key: Path
    der: bytes

    @property
    def pin(self) -> str:
        return "sha256:" + hashlib.sha256(self.der).hexdigest()


class Authority:
    """A CA in ``directory``; ``bundle`` (``NAME.pem`` unless given) is the file peers are
    told to trust."""

    def __init__(
        self,
        directory: Path,
        name: str = "BorderLink Test CA",
        days: float = 30,
        bundle: Path | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = bundle or directory / f"{name.lower().replace(' ', '-')}.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = ("127.0.0.1",),
        days: float = 20,
        not_before_days: float = -1,
        certificate: Path | None = None,
    ) -> Issued:
        """A certificate for ``name`` (server and client use), valid ``days`` from now, in
        ``certificate`` (``NAME.crt`` unless given) with its key beside it (``.key``)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        alt: list[x509.GeneralName] = [x509.DNSName(d) for d in (name, *dns)]
        alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=not_before_days))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        certificate = certificate or self.directory / f"{name}.crt"
        certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = certificate.with_suffix(".key")
        key_path.touch(mode=0o600)  # private before the key is in it
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return Issued(certificate, key_path, cert.public_bytes(serialization.Encoding.DER))


def make_site_pki(folder: Path, site: str, agency_ca: str, dns_name: str) -> None:
    """``folder/SITE-ca.pem`` (the agency CA peers trust) and ``SITE-site.pem/.key``
    (the site's identity on the link, for ``dns_name`` and 127.0.0.1)."""
    ca = Authority(folder, agency_ca, days=DEMO_DAYS, bundle=folder / f"{site}-ca.pem")
    ca.issue(dns_name, days=DEMO_DAYS, certificate=folder / f"{site}-site.pem")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
