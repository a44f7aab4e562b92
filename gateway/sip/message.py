"""One SIP message, parsed once where it enters: the value every other module reads.

Each message a transport receives (a datagram, or one cut off a stream) is read here
exactly once into a :class:`SipMessage`: start line, header lines, the body cut at
Content-Length, and where it came from (:class:`Source`). The call logic, admission,
links and the transport's own transactions read its fields; nothing re-reads the bytes.

Headers are read as RFC 3261 §7.3 says and phones send them: names are
case-insensitive and may be compact (``i:``, ``v:``…), several Vias may share a line,
an empty header (baresip's ``Supported:``) is skipped, and repeated headers are all
kept in order. What is hostile or broken raises :class:`MessageError`, whose
``headers`` still let the transport answer 400 to a request it can place (a Call-ID
and a CSeq): more than :data:`MAX_HEADERS` lines, a line without a name, a
Content-Length that is not a single number or runs past the body (RFC 3261 §18.3),
no From/To with a SIP URI, a CSeq that is not a number below 2**31 (§8.1.1.5) and a
method, no Call-ID or Via.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

MAX_HEADERS = 100  # a header flood is refused, not parsed
# The methods the call logic handles; others are answered 501.
METHODS = frozenset({"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "INFO"})

_COMPACT = {  # RFC 3261 §7.3.3 (and RFC 3515/3841/4028 for the rest)
    "i": "call-id",
    "f": "from",
    "t": "to",
    "v": "via",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
    "e": "content-encoding",
    "s": "subject",
    "o": "event",
    "r": "refer-to",
    "u": "allow-events",
    "x": "session-expires",
}
# How the headers the gateway copies into responses are spelt there (and a test peer
# writing raw requests spells them, unless it asks for other spellings).
SPELLING = {
    "via": "Via",
    "from": "From",
    "to": "To",
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "contact": "Contact",
    "content-type": "Content-Type",
    "content-length": "Content-Length",
}
_CSEQ = re.compile(r"^(\d{1,10})\s+([A-Za-z]+)$")
_SIP_URI = re.compile(r"^sips?:", re.I)

Address = tuple[str, int]


@dataclass(frozen=True)
class Source:
    """Where a SIP message came from (or goes to), and what its transport proved.

    ``identity`` is set only by a transport that authenticated the peer (a TLS
    certificate that verified); nothing the peer wrote in a header ever lands here.
    Responses go back over the same transport, to ``address``.
    """

    address: Address
    transport: str = "udp"  # "udp" | "tcp" | "tls"
    identity: str = ""  # verified TLS peer identity (certificate name or pin), else ""
    # The verified TLS certificate itself (DER), for a caller with its own trust rules (links).
    certificate: bytes = field(default=b"", compare=False, repr=False)

    @property
    def secure(self) -> bool:
        return self.transport == "tls"

    def __str__(self) -> str:
        return f"{self.transport}:{self.address[0]}:{self.address[1]}"


class Headers:
    """Header lines in order, names in lower case with compact forms spelt out, one Via
    per entry; repeated names kept."""

    __slots__ = ("first", "lines")

    def __init__(self, lines: tuple[tuple[str, str], ...] = ()) -> None:
        self.lines = lines  # names already as :func:`_name` spells them
        self.first = dict(reversed(lines))  # each name's first value

    @classmethod
    def of(cls, *pairs: tuple[str, str]) -> Headers:
        """Headers from (name, value) pairs named in any case or compact form."""
        return cls(tuple((_name(name), value) for name, value in pairs))

    def get(self, name: str, default: str = "") -> str:
        """The first value of ``name`` (any case, full or compact form)."""
        return self.first.get(_name(name), default)

    def all(self, name: str) -> list[str]:
        name = _name(name)
        return [v for n, v in self.lines if n == name]

    def __contains__(self, name: str) -> bool:
        return _name(name) in self.first

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.lines)

    def __len__(self) -> int:
        return len(self.lines)

    def transaction(self) -> tuple[str, int, str] | None:
        """(Call-ID, CSeq number, CSeq method): what a response must match; None when a
        request carries no such pair and no Via (nothing can be answered)."""
        call_id = self.first.get("call-id")
        cseq = _CSEQ.match(self.first.get("cseq", ""))
        if not call_id or cseq is None or "via" not in self.first:
            return None
        return call_id, int(cseq[1]), cseq[2].upper()

    def copied(self) -> list[tuple[str, str]]:
        """Via, From, To, Call-ID and CSeq as a response copies them (RFC 3261 §8.2.6.2)."""
        return [(SPELLING[n], v) for n, v in self.lines if n in _COPIED]


_COPIED = frozenset({"via", "from", "to", "call-id", "cseq"})


def _name(name: str) -> str:
    low = name.lower()
    return _COMPACT.get(low, low) if len(low) == 1 else low


@dataclass(frozen=True)
class NameAddr:
    """A From or To header: the URI inside, its tag, and the header text without the tag."""

    uri: str
    tag: str
    text: str  # the value as written, its ``;tag=`` taken out (what a dialog keeps)

    @property
    def user(self) -> str:
        """The URI's user part (the dialled number in a To), or ""."""
        rest = self.uri.split(":", 1)[-1]
        user, at, _ = rest.partition("@")
        return user.split(";")[0] if at else ""


@dataclass(frozen=True, eq=False)
class SipMessage:
    """A request (``method`` set, ``status`` 0) or a response (``status`` set)."""

    method: str
    uri: str  # the Request-URI ("" in a response)
    status: int
    reason: str  # the response's reason phrase
    call_id: str
    cseq: int
    cseq_method: str
    sender: NameAddr  # From
    recipient: NameAddr  # To
    vias: tuple[str, ...]
    contact: str  # the first Contact's URI, or ""
    content_type: str  # the media type alone, lower case ("application/sdp"), or ""
    body: bytes  # cut at Content-Length
    headers: Headers
    source: Source
    raw: bytes = field(repr=False)

    @property
    def is_response(self) -> bool:
        return self.status != 0

    @property
    def transaction(self) -> tuple[str, int, str]:
        return self.call_id, self.cseq, self.cseq_method

    def text(self) -> str:
        """The body as text (SDP, labels); bytes that are not UTF-8 are replaced."""
        return self.body.decode("utf-8", "replace")


class MessageError(ValueError):
    """Not a SIP message the gateway can act on. ``headers``: what was read before the
    fault (enough to answer 400 when it names a transaction); ``request``: the start
    line was a well-formed request line."""

    def __init__(self, why: str, headers: Headers | None = None, request: bool = False) -> None:
        super().__init__(why)
        self.headers = headers or Headers()
        self.request = request


def contact_uri(value: str) -> str:
    """The URI of a Contact (or any name-addr) value: inside ``<>``, else up to ``;``."""
    start = value.find("<")
    if start >= 0:
        end = value.find(">", start)
        return value[start + 1 : end if end > start else None].strip()
    return value.split(";")[0].strip()


def parse(data: bytes, source: Source) -> SipMessage:
    """``data`` read once into a :class:`SipMessage`; :class:`MessageError` says why not."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        raise MessageError("no end of headers")
    text = head.decode("utf-8", "replace")
    lines = text.split("\r\n")
    if len(lines) > MAX_HEADERS:
        raise MessageError(f"more than {MAX_HEADERS} header lines")
    first = lines[0]
    request = _request_line(first) is not None
    headers = _header_lines(lines[1:], request)
    try:
        length = _content_length(headers, len(body))
    except MessageError as error:
        raise MessageError(str(error), headers, request) from None
    if length is not None:
        body = body[:length]
    try:
        return _message(first, headers, body, source, data)
    except MessageError as error:
        raise MessageError(str(error), headers, request) from None


def _header_lines(lines: list[str], request: bool) -> Headers:
    out: list[tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not name or " " in name or "\t" in name:
            why = f"header line without a name: {line[:40]!r}"
            raise MessageError(why, Headers(tuple(out)), request)
        if not value:
            continue  # an empty header (baresip's "Supported:") says nothing
        name = _name(name)
        if name == "via":
            out.extend(("via", via.strip()) for via in value.split(",") if via.strip())
        else:
            out.append((name, value))
    return Headers(tuple(out))


def _content_length(headers: Headers, available: int) -> int | None:
    values = headers.all("content-length")
    if not values:
        return None
    if len(values) > 1 or not values[0].isdigit():
        raise MessageError("Content-Length is not one number")
    length = int(values[0])
    if length > available:
        raise MessageError(f"Content-Length {length} runs past the body ({available} bytes)")
    return length


def _message(first: str, headers: Headers, body: bytes, source: Source, raw: bytes) -> SipMessage:
    method, uri, status, reason = "", "", 0, ""
    if first.startswith("SIP/2.0 "):
        code, _, reason = first[8:].partition(" ")
        if len(code) != 3 or not code.isdigit() or not 100 <= int(code) < 700:
            raise MessageError(f"bad status line: {first[:40]!r}")
        status = int(code)
    else:
        line = _request_line(first)
        if line is None:
            raise MessageError(f"bad request line: {first[:40]!r}")
        method, uri = line  # methods are case-sensitive (RFC 3261 §7.1)
    first = headers.first
    call_id = first.get("call-id")
    if not call_id:
        raise MessageError("no Call-ID")
    cseq = _CSEQ.match(first.get("cseq", ""))
    if cseq is None or int(cseq[1]) >= 1 << 31:
        raise MessageError("CSeq is not a number below 2**31 and a method")
    vias = tuple(headers.all("via"))
    if not vias or any(len(via.split(None, 1)) < 2 for via in vias):
        raise MessageError("no Via with a transport and an address")
    if "content-encoding" in first and body:
        raise MessageError("encoded bodies are not read")
    content_type = first.get("content-type", "").split(";")[0].strip().lower()
    return SipMessage(
        method=method,
        uri=uri,
        status=status,
        reason=reason.strip(),
        call_id=call_id,
        cseq=int(cseq[1]),
        cseq_method=cseq[2].upper(),
        sender=_name_addr(first.get("from", ""), "From"),
        recipient=_name_addr(first.get("to", ""), "To"),
        vias=vias,
        contact=contact_uri(first.get("contact", "")),
        content_type=content_type,
        body=body,
        headers=headers,
        source=source,
        raw=raw,
    )


def _request_line(first: str) -> tuple[str, str] | None:
    """(method, Request-URI) of ``METHOD URI SIP/2.0``; None when it is not one."""
    parts = first.split(" ")
    if len(parts) != 3 or parts[2] != "SIP/2.0" or not parts[1]:
        return None
    if not (parts[0].isascii() and parts[0].isalpha()):
        return None
    return parts[0], parts[1]


def _name_addr(value: str, name: str) -> NameAddr:
    uri = contact_uri(value)
    if not _SIP_URI.match(uri):
        raise MessageError(f"{name} has no SIP URI")
    close = value.find(">")
    params = value[close + 1 :] if close >= 0 else value[value.find(uri) + len(uri) :]
    at = params.lower().find(";tag=")
    if at < 0:
        return NameAddr(uri, "", value)
    end = params.find(";", at + 5)
    tag = params[at + 5 : end if end >= 0 else None].strip()
    kept = value[: len(value) - len(params) + at] + (params[end:] if end >= 0 else "")
    return NameAddr(uri, tag, kept)
