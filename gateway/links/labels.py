"""Who is talking, by name: one SIP INFO in the link dialog per over, over its TLS.

The talker extension on every RTP packet (:mod:`gateway.links.talker`) says only
what the shared floor needs — keyed, priority, emergency, a talker ID and the
key-up time. Header extensions are authenticated by SRTP but not encrypted, so the
label (``RCMP · Marine 7``: which unit of which agency) does not ride there: when an
over starts, the sending side says it once in the dialog, as an INFO (RFC 6086,
legacy usage: no Info Package) over the dialog's TLS connection::

    INFO sip:… SIP/2.0
    Content-Type: application/borderlink-talker

    talker-id=7
    key-up=16909060
    label=RCMP · Marine 7
    site=ca-bc

``site`` (optional) is the site the talker is on when it is not the sender's own: a
relay (:mod:`gateway.links.topology`) passes on the origin's over, and the far side's
shared floor ranks it as the origin's (the last tie-break is the site ID).

``key-up`` is the over's key-up time as the RTP block carries it (UTC ms mod
2^32): with the talker ID it names one over, so a talker ID reused 255 overs later
never shows an old name. The INFO is written to the connection in the tick that
starts the over, before that tick's RTP leaves, so the far side normally knows the
name by the over's first packet; until it does (one round trip at most), it shows
the peer's site ID, as for a peer without labels, and a label that comes after the
over was named that way is followed by a ``talker_named`` event (the trunk's).

Everything received is hostile: :func:`read` returns a :class:`Rejected` (a
metrics reason) for a body that is not ours or a label we will not show, and a
:class:`Budget` caps how many labels a peer may send (a flood costs a counter, not
the loop).
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass

from gateway.links.talker import MAX_LABEL_BYTES, Rejected

CONTENT_TYPE = "application/borderlink-talker"
MAX_BODY = 256  # bytes: three short lines
RATE = 20.0  # labels a second a peer may send on one link (an over each, on every shared name)
BURST = 50  # ... and at once (many shared names keyed together)
SITE = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


@dataclass(frozen=True, slots=True)
class Named:
    """One over's label, as the peer said it."""

    talker_id: int  # 1-255
    keyed_at: int  # UTC ms mod 2^32, as on the RTP packets of that over
    label: str
    site: str = ""  # the talker's site when a relay passes it on ("": the sender's own)


def body(named: Named) -> str:
    text = f"talker-id={named.talker_id}\r\nkey-up={named.keyed_at}\r\nlabel={named.label}\r\n"
    return text + (f"site={named.site}\r\n" if named.site else "")


def info_fields(
    content_type: str, data: bytes, expected: str, max_body: int, names: tuple[bytes, ...] = ()
) -> dict[bytes, bytes] | None:
    """The ``name=value`` lines of one of our INFO bodies (``content_type`` as the message
    says it); None unless the body is exactly ours: the expected type, not too long, each
    line a pair, no name twice, and only ``names`` when given. Labels and topology alike."""
    if content_type.split(";")[0].strip().lower() != expected or len(data) > max_body:
        return None
    fields: dict[bytes, bytes] = {}
    for line in data.split(b"\r\n"):
        if not line:
            continue
        name, equals, value = line.partition(b"=")
        if not equals or name in fields or (names and name not in names):
            return None
        fields[name] = value
    return fields


def read(content_type: str, data: bytes) -> Named | Rejected:
    """The label an INFO body names (``content_type`` as the message says it)."""
    fields = info_fields(content_type, data, CONTENT_TYPE, MAX_BODY)
    if fields is None:
        return Rejected("info")
    talker_id, keyed_at = fields.get(b"talker-id", b""), fields.get(b"key-up", b"")
    if not (talker_id.isdigit() and keyed_at.isdigit() and len(keyed_at) <= 10):
        return Rejected("info")
    if not (1 <= int(talker_id) <= 255 and int(keyed_at) < 1 << 32):
        return Rejected("info")
    raw = fields.get(b"label", b"")
    if len(raw) > MAX_LABEL_BYTES:
        return Rejected("label_too_long")
    try:
        label = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Rejected("label_text")
    if not label or any(unicodedata.category(c).startswith("C") for c in label):
        return Rejected("label_text")  # control characters: terminal escapes, bidi overrides
    site = fields.get(b"site", b"")
    if site and not SITE.match(site):
        return Rejected("info")
    return Named(int(talker_id), int(keyed_at), label, site.decode())


class Budget:
    """A token bucket: ``rate`` labels a second, ``burst`` at once."""

    def __init__(self, rate: float = RATE, burst: int = BURST) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
