"""The one seam to pyVoIP 1.6.8: its SIP parser, REGISTER builder and MD5 digest.

pyVoIP is the design card's choice for SIP signalling, but its threads must stay
out of the audio and its transport out of the event loop. So it is used as a
*message library* only — :class:`Dialect` subclasses ``SIPClient`` and is never
``start()``-ed — and the gateway owns the UDP socket, transactions and media.
Each pyVoIP shortcoming is worked around here or where noted:

* Circular import: ``pyVoIP.VoIP`` must be imported before ``pyVoIP.SIP``.
* Its receive thread polls with 10 ms sleeps and its ``register()`` blocks for
  up to 30 s holding the socket lock, then stops the client for good after three
  failures (so a registrar restart would end registration): not used; the
  registration loop in :mod:`gateway.sip.registration` retries with backoff.
* Responses are sent to the configured server, not per Via: the stack answers
  to the source of each request (RFC 3261 §18.2.2 with rport).
* The built-in 1 s answer delay (``threading.Timer`` after 180 Ringing) and its
  RTP threads (sleep-paced, 8-bit audio API, PCMA encoded with µ-law) are not
  used: calls are answered at once and media is :mod:`gateway.sip.bank`.
* Its parser needs every header as ``Name: value``: an empty header (baresip
  sends ``Supported:``) raises, compact names (``i:``, ``v:``) and several Vias
  on one line are not understood, and it compares header names and the
  Content-Type case-sensitively (``APPLICATION/SDP`` left the body unparsed and
  a TypeError further on), although RFC 3261 §7.3.1 and RFC 2045 make both
  case-insensitive. :func:`parse` rewrites the header block into that form
  first: canonical names, the media type in lower case, one Via per line.
* It takes any Content-Length: :func:`parse` refuses a negative one or one
  longer than the datagram's body (RFC 3261 §18.3) and cuts the body at a shorter one.
* Its From/To parser knows only ``sip:``: a ``sips:`` URI (a TLS caller, or the
  far end of a ``sips:`` dial-out) raised. :func:`normalise` hands it ``sip:``
  there; the stack reads URIs it keeps from the message's own text.
* Its parser knows only INVITE/ACK/BYE/CANCEL: OPTIONS (keepalives from PBXs) and
  INFO (a link's talker labels) are added to the list it accepts; other methods
  are answered 501 before parsing. It reads any body as ``key=value`` lines
  (keeping only SDP's): a line without ``=`` or not UTF-8 makes a message unparsed.
* Call-IDs come from a per-client counter (two accounts collide): replaced.
* Its REGISTER says ``SIP/2.0/UDP`` in Via and ``transport=UDP`` in Contact:
  :class:`Dialect` rewrites both for the account's transport (the digest ``uri``
  keeps pyVoIP's text: it is hashed as written, so the registrar still agrees).
* Still missing and not worked around: digest ``qop=auth``, 407 proxy
  challenges, multiple headers of one name (only the first Contact/Record-Route
  is kept), IPv6.
"""

from __future__ import annotations

import re
import secrets

import pyVoIP
import pyVoIP.VoIP  # noqa: F401  (must come before pyVoIP.SIP: circular import in 1.6.8)
from pyVoIP.SIP import SIPClient, SIPMessage, SIPMessageType

for _method in ("OPTIONS", "INFO"):
    if _method not in pyVoIP.SIPCompatibleMethods:
        pyVoIP.SIPCompatibleMethods.append(_method)

PARSED_METHODS = frozenset(pyVoIP.SIPCompatibleMethods)


class _NoPhone:
    """SIPClient writes a status on its phone; the gateway has no VoIPPhone."""

    _status = None


class Dialect(SIPClient):
    """pyVoIP's message builders for one account, without its socket or threads."""

    def __init__(
        self,
        server: str,
        port: int,
        username: str,
        password: str,
        my_ip: str,
        my_port: int,
        expires: int,
        transport: str = "udp",
    ) -> None:
        super().__init__(
            server, port, username, password, phone=_NoPhone(), myIP=my_ip, myPort=my_port
        )
        self.default_expires = expires
        self.transport = transport

    def gen_call_id(self) -> str:
        """pyVoIP hashes a per-client counter, so two accounts send the same Call-ID and
        their transactions collide; a random one is unique across accounts."""
        return f"{secrets.token_hex(16)}@{self.myIP}:{self.myPort}"

    def first_register(self, deregister: bool = False) -> str:
        return self._over_transport(self.gen_first_response(deregister=deregister))

    def answer_challenge(self, challenge: SIPMessage, deregister: bool = False) -> str:
        """REGISTER with an Authorization built from a 401's WWW-Authenticate (MD5, no qop)."""
        return self._over_transport(self.gen_register(challenge, deregister=deregister))

    def _over_transport(self, request: str) -> str:
        """pyVoIP writes UDP into Via and Contact; say the transport the request goes over."""
        if self.transport == "udp":
            return request
        request = request.replace("Via: SIP/2.0/UDP ", f"Via: SIP/2.0/{self.transport.upper()} ", 1)
        return request.replace(";transport=UDP>", f";transport={self.transport}>", 1)

    def start(self) -> None:  # pragma: no cover - guard
        raise RuntimeError("Dialect is a message builder; the gateway owns the socket")


_COMPACT = {  # RFC 3261 §7.3.3 (and RFC 3515/3841/4028 for the rest)
    b"i": b"Call-ID",
    b"f": b"From",
    b"t": b"To",
    b"v": b"Via",
    b"m": b"Contact",
    b"l": b"Content-Length",
    b"c": b"Content-Type",
    b"k": b"Supported",
    b"e": b"Content-Encoding",
    b"s": b"Subject",
    b"o": b"Event",
    b"r": b"Refer-To",
    b"u": b"Allow-Events",
    b"x": b"Session-Expires",
}
# The names pyVoIP (or the gateway) looks up, spelled as they look them up.
_CANONICAL = {
    name.lower(): name
    for name in (
        b"Via",
        b"From",
        b"To",
        b"Call-ID",
        b"CSeq",
        b"Contact",
        b"Content-Length",
        b"Content-Type",
        b"Content-Encoding",
        b"Max-Forwards",
        b"Allow",
        b"Supported",
        b"WWW-Authenticate",
        b"Authorization",
        b"Proxy-Authenticate",
        b"Proxy-Authorization",
        b"Record-Route",
        b"Route",
        b"Expires",
        b"User-Agent",
    )
}
MAX_HEADERS = 100  # a header flood is refused, not parsed


_SIPS = re.compile(rb"(^|<)sips:", re.I)


def normalise(data: bytes) -> bytes | None:
    """Headers as pyVoIP can read them: ``Name: value``, canonical full names, one Via per
    line, the Content-Type's media type in lower case and the body cut at Content-Length.

    None when the message cannot be a SIP message (no header end, a line without a
    name, too many headers, a Content-Length that is negative or longer than the body).
    """
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        return None
    lines = head.split(b"\r\n")
    if len(lines) > MAX_HEADERS:
        return None
    out = [lines[0]]
    length: int | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        name, value = name.strip(), value.strip()
        if not colon or not name or b" " in name:
            return None
        if not value:
            continue
        low = name.lower()
        name = _COMPACT.get(low, name) if len(name) == 1 else _CANONICAL.get(low, name)
        if name in (b"From", b"To"):
            value = _SIPS.sub(rb"\1sip:", value, count=1)
        if name == b"Via":
            out.extend(b"Via: " + via.strip() for via in value.split(b",") if via.strip())
            continue
        if name == b"Content-Type":  # type/subtype are case-insensitive (RFC 2045 §5.1)
            media_type, _, _parameters = value.partition(b";")
            value = media_type.strip().lower()
        elif name == b"Content-Length":
            if not value.isdigit() or length is not None:
                return None
            length = int(value)
            if length > len(body):
                return None
            body = body[:length]
        out.append(name + b": " + value)
    return b"\r\n".join(out) + b"\r\n\r\n" + body


def parse(data: bytes) -> SIPMessage | None:
    """A parsed SIP message, or None when pyVoIP cannot make sense of it."""
    clean = normalise(data)
    if clean is None:
        return None
    try:
        message = SIPMessage(clean)
    except Exception:
        return None
    headers = message.headers
    needed = ("Call-ID", "CSeq", "From", "To")
    if any(name not in headers for name in needed) or not headers["Via"]:
        return None
    if not all(isinstance(headers[name], dict) for name in ("CSeq", "From", "To")):
        return None
    if not str(headers["CSeq"]["check"]).isdigit() or int(headers["CSeq"]["check"]) >= 1 << 31:
        return None  # RFC 3261 §8.1.1.5: a 32-bit unsigned integer below 2**31
    return message


def is_response(message: SIPMessage) -> bool:
    return message.type == SIPMessageType.RESPONSE


__all__ = ["PARSED_METHODS", "Dialect", "SIPMessage", "is_response", "parse"]
