"""TLS for SIP: the site's certificate, who is trusted, and what a peer proved.

Three questions, answered here and nowhere else:

* **Is the configured certificate usable?** :func:`load_certificates` (and
  :func:`load_certificate`, :func:`load_ca`), :func:`load_key` and
  :func:`check_key_matches` read the PEM files, ``[sip]``'s and the links', and say what is
  wrong in words (missing, unreadable, not PEM, expired, the key belongs to another
  certificate), so ``borderlink check`` and a reload refuse a site that would fail
  its first handshake.
* **Whom do we trust?** Callers (peers that connect to us) may present a client
  certificate; one that verifies against ``tls_ca`` gives the connection an
  identity, one that does not ends the handshake. Servers we connect to (the
  registrar, a dial-out) must always prove who they are: against ``tls_ca`` (or the
  system's CAs) with the host name checked, or — when ``tls_pins`` are configured —
  by presenting exactly one of the pinned certificates (a self-signed one too).
* **What did the peer prove?** :func:`peer_identity` turns a finished handshake into
  ``Source.identity``: the certificate's first DNS name (else its common name) when
  the CA verified it, ``sha256:<hex>`` when a pin matched, ``""`` for a caller who
  showed no certificate.

A failed handshake is counted and logged at most once per peer address a minute
(:class:`HandshakeLog`, bounded), so a stranger cannot fill the log.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import ssl
import time
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

log = logging.getLogger(__name__)

# As people paste them: "sha256:ab…", "AB:CD:…", or openssl's "sha256 Fingerprint=AB:…".
_PIN = re.compile(r"^(?:sha-?256(?::| fingerprint=))?([0-9a-f]{2}(?::?[0-9a-f]{2}){31})$")


# --- the configured files --------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {str(path)!r} is a directory, not a PEM file") from None
    except OSError as exc:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {exc.strerror}") from None


def load_certificates(
    path: Path, what: str = "certificate", now: dt.datetime | None = None, dated: bool = True
) -> list[x509.Certificate]:
    """Every certificate in a PEM file, each valid now unless not ``dated`` (a CA bundle may
    carry an expired root beside good ones). The links' files are read here too."""
    data = _read(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(
            f"{what} {str(path)!r} holds no PEM certificate "
            "('-----BEGIN CERTIFICATE-----' expected)"
        ) from None
    now = now or dt.datetime.now(dt.UTC)
    for cert in certificates if dated else ():
        named = f"{what} {str(path)!r} ({cert.subject.rfc4514_string() or 'no subject'})"
        if cert.not_valid_after_utc <= now:
            raise ValueError(
                f"{named} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; renew it"
            )
        if cert.not_valid_before_utc > now:
            raise ValueError(
                f"{named} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                "(check the host's clock)"
            )
    return certificates


def load_certificate(path: Path, now: dt.datetime | None = None) -> x509.Certificate:
    """The site's certificate (the first in the PEM file), refused when not valid now."""
    return load_certificates(path, "certificate", now)[0]


def load_key(path: Path) -> PrivateKeyTypes:
    """The private key: readable, unencrypted PEM (the gateway starts unattended)."""
    data = _read(path, "key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(
            f"key {str(path)!r} is protected by a passphrase; the gateway starts unattended: "
            "store it unencrypted, readable only by the gateway's user"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(
            f"key {str(path)!r} holds no PEM private key ('-----BEGIN PRIVATE KEY-----' expected)"
        ) from None


def check_key_matches(path: Path, cert: x509.Certificate, cert_path: Path) -> None:
    """The private key must load (:func:`load_key`) and be the certificate's own."""
    mine = (
        load_key(path)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    theirs = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if mine != theirs:
        raise ValueError(
            f"key {str(path)!r} does not match certificate {str(cert_path)!r} "
            "(it is the key of another certificate)"
        )


def load_ca(path: Path) -> list[x509.Certificate]:
    return load_certificates(path, "CA bundle", dated=False)


def normalise_pin(pin: str) -> str:
    """A SHA-256 certificate fingerprint → ``sha256:<64 lower-case hex>`` (colons,
    case and openssl's ``sha256 Fingerprint=`` prefix allowed), as the links' pins."""
    match = _PIN.match(pin.strip().lower())
    if not match:
        raise ValueError(
            f"{pin!r} is not a SHA-256 fingerprint: 64 hex digits, colons allowed "
            "(openssl x509 -noout -fingerprint -sha256 -in CERT prints it)"
        )
    return "sha256:" + match.group(1).replace(":", "").lower()


def fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def expiry_days(cert: x509.Certificate, now: dt.datetime | None = None) -> float:
    now = now or dt.datetime.now(dt.UTC)
    return (cert.not_valid_after_utc - now).total_seconds() / 86400


# --- contexts ----------------------------------------------------------------------------


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION  # CRIME; CPU for free
    return context


def server_context(
    certificate: Path, key: Path, ca: Path | None, more_cas: tuple[Path, ...] = ()
) -> ssl.SSLContext:
    """For callers: our certificate; a client certificate is asked for only when there is
    a CA to check it against (``tls_ca``, and the links' peer CAs in ``more_cas``), and it
    is optional (phones rarely have one)."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(certificate, key)
    for path in (ca, *more_cas):
        if path is not None:
            context.load_verify_locations(cafile=str(path))
            context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(
    certificate: Path | None, key: Path | None, ca: Path | None, pinned: bool
) -> ssl.SSLContext:
    """For servers we connect to: verified by the CA and host name, or (``pinned``) by
    pin after the handshake. Our own certificate goes along as a client certificate."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if pinned:  # the pin, checked by peer_identity(), is the whole proof
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca is not None:
        context.load_verify_locations(cafile=str(ca))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if certificate is not None and key is not None:
        context.load_cert_chain(certificate, key)
    return context


def _name_of(certificate: dict) -> str:
    for kind, value in certificate.get("subjectAltName", ()):
        if kind in ("DNS", "URI"):
            return str(value)
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def peer_identity(ssl_object: ssl.SSLObject | None, pins: frozenset[str]) -> str | None:
    """What the peer proved in the handshake; None when it must be refused.

    With ``pins`` (servers we connect to) the certificate must be one of them. Otherwise
    OpenSSL has already verified whatever certificate was presented (a bad one fails the
    handshake), so a certificate here is a verified one.
    """
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if pins:
        pin = fingerprint(der) if der else ""
        return pin if pin in pins else None
    if not der:
        return ""
    verified = ssl_object.getpeercert()
    return (_name_of(verified) if verified else "") or fingerprint(der)


# --- failed handshakes --------------------------------------------------------------------


class HandshakeLog:
    """Failed handshakes: every one counted, at most one log line per peer address a minute.

    The table of recently logged peers is bounded (oldest forgotten first), and all
    peers together get at most ``burst`` lines a minute; what was not logged is
    summed into the next line, so an attack from many addresses shows as a count.
    """

    def __init__(self, interval: float = 60.0, peers: int = 256, burst: int = 20) -> None:
        self.interval = interval
        self.peers = peers
        self.burst = burst
        self.failures = 0
        self.suppressed = 0
        self._last: OrderedDict[str, float] = OrderedDict()
        self._window_start = 0.0
        self._window_lines = 0

    def failed(self, peer: str, reason: str, now: float | None = None) -> bool:
        """Count a failure; True when it was logged."""
        self.failures += 1
        now = time.monotonic() if now is None else now
        last = self._last.get(peer)
        if now - self._window_start >= self.interval:
            self._window_start, self._window_lines = now, 0
        if (last is not None and now - last < self.interval) or self._window_lines >= self.burst:
            self.suppressed += 1
            return False
        self._last[peer] = now
        self._last.move_to_end(peer)
        while len(self._last) > self.peers:
            self._last.popitem(last=False)
        self._window_lines += 1
        more = f" ({self.suppressed} more failed handshakes not logged)" if self.suppressed else ""
        self.suppressed = 0
        log.warning("SIP TLS handshake with %s failed: %s%s", peer, reason, more)
        return True
