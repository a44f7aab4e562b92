"""The ``[links]`` section: the other country's gateways and what this side shares with them.

One table per link, ``[links.NAME]``: where the peer is, who we are on the link
(our certificate and key) and how we recognise the peer (its agency CA, pinned
certificate fingerprints, or both — a link is never unauthenticated), and
``[links.NAME.share]``: which local talkgroups this side offers, under which
shared name, in which direction::

    [links]
    site_id = "ca-bc"                      # optional: floor tie-break (default: site name)

    [links.us]
    peer = "gw.wa.example.us:5061"
    backup = "gw2.wa.example.us:5061"
    certificate = "/etc/borderlink/link.pem"
    key = "/etc/borderlink/link.key"
    peer_ca = "/etc/borderlink/us-agency-ca.pem"

    [links.us.share]
    shiprider = { as = "marine", direction = "both" }
    harbour = "port-ops"                   # short for { as = "port-ops", direction = "both" }

Keys of ``share`` are *local* talkgroup names (they never leave this site); ``as``
is the name the other side sees. Certificates are loaded here (by
:mod:`gateway.sip.tls`, as ``[sip]``'s are), so ``borderlink check`` and a reload
refuse a missing file, a key that does not match, or an expired certificate with the
file and line, before a link is ever dialled.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.config import Model, SiteConfig
from gateway.links.consent import SHARED_NAME, Direction, Shares
from gateway.sip.tls import (
    check_key_matches,
    load_certificate,
    load_certificates,
    load_key,
    normalise_pin,
)

_HOSTPORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+)):(?P<port>\d{1,5})$"
)
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


def split_address(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ValueError says how to write it."""
    match = _HOSTPORT.match(value.strip())
    if not match or not 1 <= int(match["port"]) <= 65535:
        raise ValueError(
            "write the address as 'host:port', e.g. 'gw.example.org:5061' or '[2001:db8::1]:5061'"
        )
    return match["v6"] or match["host"], int(match["port"])


def normalise_fingerprint(value: str) -> str:
    """A SHA-256 fingerprint as lower-case hex without colons; ValueError says the fix."""
    return normalise_pin(value).removeprefix("sha256:")


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """The SHA-256 of a certificate's DER form, as pinned in ``peer_fingerprints``."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


Fingerprint = Annotated[str, AfterValidator(normalise_fingerprint)]


class ShareConfig(Model):
    """How one local talkgroup is offered on a link."""

    shared: str = Field(alias="as", description="the name the other side sees")
    direction: Direction = "both"
    enabled: bool = True
    onward: bool = Field(
        True,
        description="a site that relays this talkgroup may pass what we send on to its "
        "other links; false: the peer's relay of this talkgroup holds back",
    )

    @field_validator("shared")
    @classmethod
    def _shared_name(cls, value: str) -> str:
        if not SHARED_NAME.match(value):
            raise ValueError(
                "a shared name is 1-32 lower-case letters, digits, '_', '.' or '-' "
                "(a peer dials it), e.g. 'marine'"
            )
        return value


class LinkConfig(Model):
    """One peer gateway: its address, both sides' TLS identities, and what we share."""

    peer: str = Field(description="host:port of the peer's SIP over TLS")
    backup: str | None = None
    peer_name: str | None = Field(
        None, description="name the peer's certificate must carry; default: peer's host"
    )
    certificate: Path
    key: Path
    peer_ca: Path | None = None
    peer_fingerprints: list[Fingerprint] = []
    share: dict[str, ShareConfig] = {}
    enabled: bool = True
    description: str = ""
    codecs: list[str] = Field(
        ["opus", "pcmu"],
        description="codecs offered and accepted on the link, preferred first",
    )

    @field_validator("peer", "backup")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            split_address(value)
        return value

    @field_validator("certificate")
    @classmethod
    def _certificate_loads(cls, value: Path) -> Path:
        load_certificate(value)
        return value

    @field_validator("key")
    @classmethod
    def _key_loads_and_matches(cls, value: Path, info: ValidationInfo) -> Path:
        certificate = info.data.get("certificate")
        if certificate is None:  # its own problem is already reported
            load_key(value)
        else:
            check_key_matches(value, load_certificate(certificate), certificate)
        return value

    @field_validator("codecs")
    @classmethod
    def _codecs(cls, value: list[str]) -> list[str]:
        unknown = [c for c in value if c not in ("opus", "pcmu")]
        if unknown:
            raise ValueError(f"unknown codec {unknown[0]!r}; a link speaks 'opus' and 'pcmu'")
        if "pcmu" not in value:
            raise ValueError(
                "'pcmu' (G.711 µ-law) is always offered, so any peer can join; "
                'write codecs = ["opus", "pcmu"] or ["pcmu"]'
            )
        if len(set(value)) != len(value):
            raise ValueError("a codec is named twice; name each once, preferred first")
        return value

    @field_validator("peer_ca")
    @classmethod
    def _ca_loads(cls, value: Path | None) -> Path | None:
        if value is not None:
            load_certificates(value, "peer CA bundle")
        return value

    @field_validator("share", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """``shiprider = "marine"`` is short for ``{ as = "marine", direction = "both" }``."""
        if isinstance(value, dict):
            return {tg: {"as": v} if isinstance(v, str) else v for tg, v in value.items()}
        return value

    @field_validator("share")
    @classmethod
    def _shared_names_unique(cls, value: dict[str, ShareConfig]) -> dict[str, ShareConfig]:
        seen: dict[str, str] = {}
        for talkgroup, entry in value.items():
            if entry.shared in seen:
                raise ValueError(
                    f"shared name {entry.shared!r} is used twice (talkgroups "
                    f"{seen[entry.shared]!r} and {talkgroup!r}); give each its own 'as'"
                )
            seen[entry.shared] = talkgroup
        return value

    @model_validator(mode="after")
    def _peer_is_authenticated(self) -> LinkConfig:
        if self.peer_ca is None and not self.peer_fingerprints:
            raise ValueError(
                "a link is never unauthenticated: set peer_ca (the peer agency's CA "
                "bundle) or peer_fingerprints (SHA-256 of the peer's certificate), or both"
            )
        return self

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where to dial, in order: the peer, then the backup."""
        return [split_address(a) for a in (self.peer, self.backup) if a]

    @property
    def expected_peer_name(self) -> str:
        return self.peer_name or split_address(self.peer)[0]

    def shares(self) -> Shares:
        """What this side offers on the link now (disabled entries left out)."""
        return Shares({e.shared: (tg, e.direction) for tg, e in self.share.items() if e.enabled})


class LinksConfig(Model):
    """``[links]``: this site's ID for the floor tie-break, and one ``[links.NAME]`` per peer."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, LinkConfig]  # type: ignore[assignment]  (each link)

    site_id: str | None = Field(
        None, description="this site on every link (floor tie-break); default: the site name"
    )
    relay: list[str] = Field(
        default_factory=list,
        description="local talkgroups this site relays between its links (a chain's middle)",
    )

    @model_validator(mode="before")
    @classmethod
    def _links_are_tables(cls, value: Any) -> Any:
        """A plain key under ``[links]`` is a typo of a link table or of ``site_id``."""
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in cls.model_fields and not isinstance(item, dict):
                    raise ValueError(
                        f"{key!r} is neither 'site_id', 'relay' nor a link: a link is a table, "
                        f"[links.{key}] with peer, certificate, key, ..."
                    )
        return value

    @field_validator("site_id")
    @classmethod
    def _site_id(cls, value: str | None) -> str | None:
        if value is not None and not _SITE_ID.match(value):
            raise ValueError("site_id is 1-32 letters, digits, '_', '.' or '-'")
        return value

    @model_validator(mode="after")
    def _relay_between_links(self) -> LinksConfig:
        """A relayed talkgroup must be shared on two links or more (else nothing to relay)."""
        for talkgroup in self.relay:
            if self.relay.count(talkgroup) > 1:
                raise ValueError(f"relay names {talkgroup!r} twice; name each talkgroup once")
            sharing = [n for n, link in self.links.items() if talkgroup in link.share]
            if len(sharing) < 2:
                on = f"only link {sharing[0]!r} shares it" if sharing else "no link shares it"
                raise ValueError(
                    f"relay names talkgroup {talkgroup!r} but {on}: a relay passes a "
                    "talkgroup between two or more links; share it on each "
                    "([links.NAME.share]) or remove it from relay"
                )
        return self

    @property
    def links(self) -> dict[str, LinkConfig]:
        return dict(self.model_extra or {})

    def summary_lines(self) -> list[str]:
        """What ``borderlink check`` prints: each peer, what we share, and the fingerprint
        of our certificate — what the other side pins."""
        lines = [f"relays {tg} between its links" for tg in self.relay]
        for name, link in self.links.items():
            backup = f" (backup {link.backup})" if link.backup else ""
            state = "" if link.enabled else " CUT (enabled = false)"
            lines.append(f"{name:<12} peer {link.peer}{backup}{state}")
            for talkgroup, entry in link.share.items():
                off = "" if entry.enabled else " (not offered: enabled = false)"
                off += "" if entry.onward else " (not to be relayed onward)"
                lines.append(f"  shares {talkgroup} as {entry.shared!r} ({entry.direction}){off}")
            try:
                leaf = load_certificate(link.certificate)
            except ValueError as exc:  # changed on disk since it was checked
                lines.append(f"  our certificate: {exc}")
                continue
            pin = certificate_fingerprint(leaf).upper()
            pairs = ":".join(pin[i : i + 2] for i in range(0, 64, 2))
            lines.append(f"  our certificate SHA-256 {pairs} (the peer pins this)")
        return lines

    def section_problems(self, sections: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
        """Links run on the SIP stack's TLS listener: say so before the gateway starts."""
        if not any(link.enabled for link in self.links.values()):
            return []
        sip = sections.get("sip")
        if sip is None or not sip.listen_tls or sip.tls_certificate is None:
            return [
                (
                    (),
                    'links run over SIP TLS: add [sip] with listen_tls = "0.0.0.0:5061", '
                    "tls_certificate and tls_key (the certificate the peer verifies when "
                    "it dials this side; the link's own certificate is a good choice)",
                )
            ]
        return []

    def talkgroup_references(self) -> list[tuple[tuple[str, ...], str]]:
        """Every local talkgroup a link shares, for the config loader to check.

        Why here: the section cannot see the rest of the file; the loader can, and
        reports an unknown name with file:line and a did-you-mean (see
        ``gateway.config._section_references``).
        """
        return [
            ((name, "share", talkgroup), talkgroup)
            for name, link in self.links.items()
            for talkgroup in link.share
        ] + [(("relay", str(i)), talkgroup) for i, talkgroup in enumerate(self.relay)]


def site_id(config: SiteConfig) -> str:
    """This site's ID on its links: ``[links] site_id``, else the site name made safe."""
    links = config.section("links")
    if links is not None and links.site_id:
        return links.site_id
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", config.site.name).strip("-")[:32] or "site"
