"""The ``[sip]`` section: where the gateway listens, which PBX it registers with,
which dialled numbers reach which talkgroup, and which talkgroups dial out.

Written for the person wiring a site: numbers are the keys of ``[sip.routes]``
(quote them: ``[sip.routes."6001"]``), durations carry units, and an address is
``host:port``.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import ClassVar, Literal

from cryptography.hazmat.primitives import serialization
from pydantic import Field, ValidationInfo, field_validator, model_validator

from gateway.config import Model
from gateway.sip import tls
from gateway.sip.transport import DEFAULT_PORTS, Source, uri_source
from gateway.units import Duration

SrtpPolicy = Literal["required", "optional", "off"]
SRTP_DEFAULT: SrtpPolicy = "optional"  # why: config/README.md, [sip] "SRTP"
_SRTP_FIELD = Field(
    SRTP_DEFAULT,
    description="SRTP with SDES keys, which travel only over TLS: required | optional | off",
)
_HOSTPORT = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")


def split_hostport(value: str, default_port: int = 5060) -> tuple[str, int]:
    match = _HOSTPORT.match(value)
    if match:
        return match["host"], int(match["port"])
    return value, default_port


def _check_hostport(value: str, what: str) -> str:
    host, port = split_hostport(value)
    if not host or not 0 <= port <= 65535 or not re.match(r"^[A-Za-z0-9.\-]+$", host):
        raise ValueError(f"{what} must be 'host:port' such as '127.0.0.1:5060', got {value!r}")
    return value


def _registrar_uri(value: str) -> Source | None:
    """A registrar written as a URI (``sips:host``, ``sip:host;transport=tcp``), parsed."""
    return uri_source(value) if value.lower().startswith(("sip:", "sips:")) else None


class AccountConfig(Model):
    """One extension the gateway registers on a PBX/registrar (digest auth; UDP, TCP or TLS)."""

    registrar: str = Field(
        description="host:port, or a URI: sips:host[:port], sip:host;transport=tcp"
    )
    username: str = Field(min_length=1)
    password: str = ""
    transport: Literal["udp", "tcp", "tls"] | None = Field(
        None, description="default: what the registrar URI says, else udp"
    )
    expires: Duration = 300.0
    keepalive: Duration = Field(
        5.0, description="REGISTER this often: a registrar that restarted knows us again"
    )
    srtp: SrtpPolicy = _SRTP_FIELD

    @field_validator("registrar")
    @classmethod
    def _registrar_hostport(cls, value: str) -> str:
        if value.lower().startswith(("sip:", "sips:")):
            if _registrar_uri(value) is None:
                raise ValueError(
                    "registrar must be 'host:port' or a URI such as 'sips:pbx.example.org:5061' "
                    "or 'sip:pbx.example.org;transport=tcp' (transports: udp, tcp, tls)"
                )
            return value
        return _check_hostport(value, "registrar")

    @model_validator(mode="after")
    def _one_transport(self) -> AccountConfig:
        said = _registrar_uri(self.registrar)
        if said is not None and self.transport is not None and said.transport != self.transport:
            raise ValueError(
                f"registrar {self.registrar!r} means {said.transport}, but transport is "
                f"{self.transport!r}; say it once"
            )
        return self

    @property
    def next_hop(self) -> tuple[str, int, str]:
        """(host, port, transport) of the registrar."""
        said = _registrar_uri(self.registrar)
        if said is not None:
            return said.address[0], said.address[1], said.transport
        kind = self.transport or "udp"
        host, port = split_hostport(self.registrar, DEFAULT_PORTS[kind])
        return host, port, kind

    @field_validator("expires")
    @classmethod
    def _expires_sane(cls, value: float) -> float:
        if not 10 <= value <= 86400:
            raise ValueError("expires must be between '10s' and '24h'")
        return value

    @field_validator("keepalive")
    @classmethod
    def _keepalive_sane(cls, value: float) -> float:
        if not 1 <= value <= 3600:
            raise ValueError("keepalive must be between '1s' and '1h' ('5s' is usual)")
        return value


_HA1 = re.compile(r"^[0-9a-f]{32}$")


def trusted_entry(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """A ``trusted`` entry: an address or CIDR network, or ``tls:NAME`` (a verified peer)."""
    if value.startswith("tls:"):
        if len(value) == 4:
            raise ValueError("tls: without a name")
        return value
    return ipaddress.ip_network(value, strict=False)


class RouteConfig(Model):
    """What happens when a number is dialled: which talkgroup, who may call, how they talk.

    Who may call is said explicitly (``borderlink check`` refuses a route that does
    not): ``auth = "digest"`` with ``users`` (the gateway challenges every INVITE),
    ``trusted`` (the proxies or TLS peers that authenticated the caller for us), or
    ``public = true``. ``allow`` narrows it to identities that were proven, never a
    name the caller wrote in a header.
    """

    # How a caller talks, not where or whether: a reload that changes only these keys
    # leaves the route's calls up under the terms they were answered with. Any other
    # change (talkgroup, who may call: allow, public, pin, and keys added for caller
    # authentication) ends them: they were let in under rules that no longer hold.
    KEEPS_CALLS: ClassVar[frozenset[str]] = frozenset(
        {
            "aliases",
            "priority",
            "pin_timeout",
            "ptt",
            "vox_threshold_dbfs",
            "vox_hang",
            "dtmf_talk",
            "dtmf_release",
            "tot",
        }
    )

    talkgroup: str
    priority: int = 0
    aliases: list[str] = []
    auth: Literal["digest"] | None = Field(None, description="challenge callers (RFC 3261 digest)")
    users: dict[str, str] = Field(
        default={}, description="digest user → HA1 (from `borderlink passwd --sip USER`)"
    )
    trusted: list[str] = Field(
        default=[], description="addresses/CIDRs or tls:NAME of proxies that authenticate callers"
    )
    allow: list[str] = Field(default=[], description="authenticated identities; * wildcards")
    public: bool = Field(False, description="anyone who can reach the gateway may call")
    pin: str = Field("", pattern=r"^[0-9]*$")
    pin_timeout: Duration = 20.0
    ptt: Literal["vox", "dtmf"] = "vox"
    vox_threshold_dbfs: float = Field(-40.0, ge=-90, le=0)
    vox_hang: Duration = 0.8
    dtmf_talk: str = Field("*", pattern=r"^[0-9*#A-D]$")
    dtmf_release: str = Field("#", pattern=r"^[0-9*#A-D]$")
    tot: Duration = 180.0
    srtp: SrtpPolicy = _SRTP_FIELD

    @field_validator("users")
    @classmethod
    def _users_hashed(cls, value: dict[str, str]) -> dict[str, str]:
        for user, ha1 in value.items():
            if not _HA1.match(ha1):
                raise ValueError(
                    f"user {user!r}: give the HA1 hash that `borderlink passwd --sip {user}` "
                    "prints (32 hex digits), never the password itself"
                )
        return value

    @field_validator("trusted")
    @classmethod
    def _trusted_parse(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                trusted_entry(entry)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an address or CIDR such as '192.0.2.20' or "
                    "'192.0.2.0/24'; a TLS peer is written 'tls:NAME' (its certificate's name)"
                ) from None
        return value

    @field_validator("pin_timeout")
    @classmethod
    def _pin_timeout_sane(cls, value: float) -> float:
        if not 1 <= value <= 300:
            raise ValueError("pin_timeout must be between '1s' and '5min'")
        return value

    @model_validator(mode="after")
    def _who_may_call(self) -> RouteConfig:
        if self.auth is None and not self.trusted and not self.public:
            raise ValueError(
                'this route does not say who may call: add auth = "digest" with users '
                "(`borderlink passwd --sip USER` prints each line), trusted = [the "
                "proxy's address], or public = true for a route anyone may call"
            )
        if self.auth == "digest" and not self.users:
            raise ValueError(
                'auth = "digest" needs users: add a users table with one line per caller '
                "from `borderlink passwd --sip USER`"
            )
        if self.users and self.auth != "digest":
            raise ValueError('users are only checked with auth = "digest"; add it')
        if self.public and (self.auth or self.trusted or self.allow):
            raise ValueError(
                "public = true lets anyone call without an identity, so auth, trusted and "
                "allow mean nothing here: remove public, or remove them"
            )
        return self

    def keeps_calls_of(self, old: RouteConfig) -> bool:
        """Whether calls answered under ``old`` may stay up when it becomes this route."""
        return self.model_dump(exclude=set(self.KEEPS_CALLS)) == old.model_dump(
            exclude=set(self.KEEPS_CALLS)
        )


class DialOutConfig(Model):
    """A talkgroup that calls out (a dial-out patch), redialling with backoff when dropped."""

    talkgroup: str
    uri: str = Field(
        pattern=r"^sips?:[^@\s]+@[^\s]+$",
        description="sip:user@host[:port][;transport=tcp|tls] or sips:user@host[:port]",
    )
    when: Literal["always", "active"] = "always"
    idle_hangup: Duration = 30.0
    retry_min: Duration = 1.0
    retry_max: Duration = 60.0
    priority: int = 0
    ptt: Literal["vox", "dtmf"] = "vox"
    vox_threshold_dbfs: float = Field(-40.0, ge=-90, le=0)
    vox_hang: Duration = 0.8
    srtp: SrtpPolicy = _SRTP_FIELD

    @model_validator(mode="after")
    def _srtp_needs_tls(self) -> DialOutConfig:
        if self.srtp == "required" and not self.secure:
            raise ValueError(
                f"srtp = 'required' needs a TLS dial-out (SRTP keys travel in the SIP "
                f"message): make the uri 'sips:{self.uri.split(':', 1)[1]}' or set "
                "srtp = 'optional'"
            )
        return self

    @property
    def secure(self) -> bool:
        """The call goes over TLS (a ``sips:`` URI, or ``;transport=tls``)."""
        source = uri_source(self.uri)
        return source is not None and source.secure


def strictest(*policies: SrtpPolicy) -> SrtpPolicy:
    """The policy of a call that several entries speak for (a route, the account it came
    through): ``required`` anywhere wins, then ``off`` (a deliberate choice for a device
    that cannot do SRTP), else ``optional``."""
    for policy in ("required", "off"):
        if policy in policies:
            return policy  # type: ignore[return-value]
    return "optional"

    @field_validator("uri")
    @classmethod
    def _uri_transport_known(cls, value: str) -> str:
        if uri_source(value) is None:
            raise ValueError("uri names a transport the gateway does not speak (udp, tcp, tls)")
        return value


class SipConfig(Model):
    listen: str = "127.0.0.1:5060"
    listen_tcp: str = Field("", description="host:port for SIP over TCP; empty: none")
    listen_tls: str = Field("", description="host:port for SIP over TLS; empty: none")
    tls_certificate: Path | None = Field(None, description="PEM: the site's certificate chain")
    tls_key: Path | None = Field(None, description="PEM: its private key (unencrypted)")
    tls_ca: Path | None = Field(None, description="PEM CA bundle that peers are verified against")
    tls_pins: list[str] = Field([], description="sha256 fingerprints of servers trusted as such")
    tls_handshake_timeout: Duration = 5.0
    max_connections: int = Field(1000, ge=1, le=100_000)
    max_connections_per_address: int = Field(20, ge=1, le=100_000)
    max_connection_rate_per_address: float = Field(
        10.0, ge=0.1, le=100_000, description="new TCP/TLS connections a second from one address"
    )
    max_message_bytes: int = Field(65536, ge=4096, le=1_048_576)
    max_header_bytes: int = Field(16384, ge=1024, le=1_048_576)
    connection_idle_timeout: Duration = 300.0
    message_timeout: Duration = 10.0
    public_address: str = ""
    user: str = "borderlink"
    rtp_ports: str = Field("", pattern=r"^$|^\d{1,5}-\d{1,5}$")
    codecs: list[Literal["pcmu", "pcma"]] = Field(["pcmu", "pcma"], min_length=1)
    accounts: dict[str, AccountConfig] = {}
    routes: dict[str, RouteConfig] = {}
    dial_out: dict[str, DialOutConfig] = {}
    transaction_timeout: Duration = 8.0
    rtcp_interval: Duration = Field(
        5.0, description="time between one call's RTCP reports (RFC 3550: 5s minimum on WANs)"
    )
    realm: str = Field(
        "borderlink", min_length=1, pattern=r'^[^"\\]+$', description="digest realm (in HA1)"
    )
    max_calls: int = Field(1000, ge=1, description="calls up at once, all sources")
    max_calls_per_source: int = Field(
        10, ge=1, description="calls up at once from one address (trusted proxies: max_calls)"
    )
    invite_rate: float = Field(
        5.0, gt=0, description="new INVITEs per second from one address (bursts of twice that)"
    )
    backoff: Duration = Field(
        60.0, description="how long an address that failed auth or the PIN is refused"
    )
    ack_timeout: Duration = Field(
        32.0, description="an answered call not confirmed by ACK this long is ended (Timer H)"
    )
    media_timeout: Duration = Field(
        60.0, description="a call that sends neither RTP nor RTCP this long is ended with BYE"
    )

    @field_validator("ack_timeout")
    @classmethod
    def _ack_timeout_sane(cls, value: float) -> float:
        if not 1 <= value <= 64:
            raise ValueError("ack_timeout must be between '1s' and '64s' (RFC 3261 Timer H: 32s)")
        return value

    @field_validator("media_timeout")
    @classmethod
    def _media_timeout_sane(cls, value: float) -> float:
        if not 1 <= value <= 3600:
            raise ValueError(
                "media_timeout must be between '1s' and '1h' (60s is usual; longer than "
                "rtcp_interval, so a phone on hold that only sends RTCP stays up)"
            )
        return value

    @field_validator("rtcp_interval")
    @classmethod
    def _rtcp_interval_sane(cls, value: float) -> float:
        if not 0.5 <= value <= 60:
            raise ValueError("rtcp_interval must be between '500ms' and '60s' (5s is usual)")
        return value

    @field_validator("listen")
    @classmethod
    def _listen_hostport(cls, value: str) -> str:
        return _check_hostport(value, "listen")

    @field_validator("listen_tcp", "listen_tls")
    @classmethod
    def _stream_hostport(cls, value: str, info: ValidationInfo) -> str:
        return _check_hostport(value, str(info.field_name)) if value else value

    @field_validator("tls_certificate")
    @classmethod
    def _certificate_usable(cls, value: Path | None) -> Path | None:
        if value is not None:
            tls.load_certificate(value)
        return value

    @field_validator("tls_key")
    @classmethod
    def _key_matches(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        certificate = info.data.get("tls_certificate")
        if value is not None and certificate is not None:
            tls.check_key_matches(value, tls.load_certificate(certificate), certificate)
        return value

    @field_validator("tls_ca")
    @classmethod
    def _ca_usable(cls, value: Path | None) -> Path | None:
        if value is not None:
            tls.load_ca(value)
        return value

    @field_validator("tls_pins")
    @classmethod
    def _pins_well_formed(cls, value: list[str]) -> list[str]:
        return [tls.normalise_pin(pin) for pin in value]

    @field_validator("tls_handshake_timeout", "connection_idle_timeout", "message_timeout")
    @classmethod
    def _stream_timer_sane(cls, value: float, info: ValidationInfo) -> float:
        if not 0.1 <= value <= 86400:
            raise ValueError(f"{info.field_name} must be between '100ms' and '24h'")
        return value

    @model_validator(mode="after")
    def _tls_complete(self) -> SipConfig:
        """Certificate and key go together; TLS and TCP uses need their listener."""
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ValueError("tls_certificate and tls_key go together: set both or neither")
        if self.listen_tls and self.tls_certificate is None:
            raise ValueError(
                "listen_tls needs the site's certificate: set tls_certificate and tls_key"
            )
        listening = {"tcp": self.listen_tcp, "tls": self.listen_tls}
        uses = [(f"[sip.accounts.{n}]", a.next_hop[2]) for n, a in self.accounts.items()]
        uses += [(f"[sip.dial_out.{n}]", self._dial_transport(d)) for n, d in self.dial_out.items()]
        for where, kind in uses:
            if kind in listening and not listening[kind]:
                raise ValueError(
                    f"{where} uses {kind.upper()}, but listen_{kind} is not set: the far end "
                    f"sends its requests to the gateway's Contact over {kind.upper()}; "
                    f'add listen_{kind} = "host:port"'
                )
        return self

    @model_validator(mode="after")
    def _srtp_reachable(self) -> SipConfig:
        """``srtp = "required"`` where no call can come over TLS would refuse every call."""
        for name, route in self.routes.items():
            if route.srtp == "required" and not self.listen_tls:
                raise ValueError(
                    f"[sip.routes.{name}] srtp = 'required' takes calls over TLS only (SDES keys "
                    "travel in the SIP message), and listen_tls is not set: every call would "
                    "be refused; set listen_tls, tls_certificate and tls_key, or srtp = 'optional'"
                )
        for name, account in self.accounts.items():
            if account.srtp == "required" and account.next_hop[2] != "tls":
                raise ValueError(
                    f"[sip.accounts.{name}] srtp = 'required' takes calls over TLS only, and its "
                    f"registrar is {account.next_hop[2].upper()}: every call through it would be "
                    "refused; make the registrar 'sips:...' or set srtp = 'optional'"
                )
        return self

    @staticmethod
    def _dial_transport(entry: DialOutConfig) -> str:
        source = uri_source(entry.uri)
        return source.transport if source is not None else "udp"

    @model_validator(mode="after")
    def _media_timeout_above_rtcp(self) -> SipConfig:
        if self.media_timeout <= self.rtcp_interval:
            raise ValueError(
                f"media_timeout ({self.media_timeout:g}s) must be longer than rtcp_interval "
                f"({self.rtcp_interval:g}s): a call on hold sends only RTCP"
            )
        return self

    @model_validator(mode="after")
    def _numbers_unique(self) -> SipConfig:
        seen: dict[str, str] = {}
        for name, route in self.routes.items():
            for number in (name, *route.aliases):
                if number in seen:
                    raise ValueError(
                        f"number {number!r} routes twice (routes {seen[number]!r} "
                        f"and {name!r}); give each number one route"
                    )
                seen[number] = name
        return self

    @property
    def rtp_range(self) -> tuple[int, int] | None:
        if not self.rtp_ports:
            return None
        low, high = (int(p) for p in self.rtp_ports.split("-"))
        return low, high

    def listener_changes(self, new: SipConfig) -> list[str]:
        """Keys of ``new`` that move the SIP sockets or what they announce: the listen
        addresses, media ports and public address. Only a restart applies them (every
        call's dialog and media are bound to the old ones). Matched by name
        (``listen_*``), so keys added to the group later are in it as they come. TLS
        files are not in it: a reload reads them again (renewed certificates)."""
        return [
            key
            for key in type(new).model_fields
            if (key in ("listen", "public_address", "rtp_ports") or key.startswith("listen_"))
            and getattr(self, key) != getattr(new, key)
        ]

    def route_for(self, number: str) -> tuple[str, RouteConfig] | None:
        for name, route in self.routes.items():
            if number == name or number in route.aliases:
                return name, route
        return None

    def summary_lines(self) -> list[str]:
        """What ``borderlink check`` prints: where SIP listens, the TLS certificate's
        fingerprint (what a peer pins) and expiry, whom TLS trusts, each account's way."""
        listening = [("udp", self.listen), ("tcp", self.listen_tcp), ("tls", self.listen_tls)]
        lines = ["listens on " + ", ".join(f"{k}:{w}" for k, w in listening if w)]
        if self.tls_certificate is not None:
            try:
                cert = tls.load_certificate(self.tls_certificate)
            except ValueError as exc:  # changed on disk since it was checked
                lines.append(f"TLS certificate: {exc}")
            else:
                der = cert.public_bytes(serialization.Encoding.DER)
                pin = tls.fingerprint(der).removeprefix("sha256:").upper()
                pairs = ":".join(pin[i : i + 2] for i in range(0, 64, 2))
                lines.append(
                    f"TLS certificate expires in {tls.expiry_days(cert):.0f} days, "
                    f"SHA-256 {pairs} (what peers pin)"
                )
        if self.listen_tls or any(a.next_hop[2] == "tls" for a in self.accounts.values()):
            servers = (
                f"{len(self.tls_pins)} pinned certificates"
                if self.tls_pins
                else (f"CA {self.tls_ca}" if self.tls_ca else "the system's CAs")
            )
            callers = f"CA {self.tls_ca}" if self.tls_ca else "no client certificates asked"
            lines.append(f"TLS servers verified by {servers}; callers: {callers}")
        for name, account in self.accounts.items():
            host, port, kind = account.next_hop
            lines.append(f"account {name}: registers at {host}:{port} over {kind.upper()}")
        return lines

    def talkgroup_references(self) -> list[tuple[tuple[str, ...], str]]:
        """Every talkgroup this section names, with its key path, for ``parse_config``.

        Why here: the section cannot see the rest of the file, but the config loader
        can; it reports each unknown name with file:line and a did-you-mean, so
        ``borderlink check`` and a reload refuse a typo before any call is routed.
        """
        references: list[tuple[tuple[str, ...], str]] = []
        for kind, entries in (("routes", self.routes), ("dial_out", self.dial_out)):
            for name, entry in entries.items():
                references.append(((kind, name, "talkgroup"), entry.talkgroup))
        return references

    def check_talkgroups(self, talkgroups: list[str]) -> list[str]:
        """Problems with talkgroup names (the section cannot see the rest of the file)."""
        problems = []
        for kind, entries in (("routes", self.routes), ("dial_out", self.dial_out)):
            for name, entry in entries.items():
                if entry.talkgroup not in talkgroups:
                    problems.append(
                        f"[sip.{kind}.{name}] talkgroup {entry.talkgroup!r} is not "
                        f"configured (talkgroups: {', '.join(talkgroups)})"
                    )
        return problems
