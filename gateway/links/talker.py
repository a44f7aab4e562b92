"""Who is talking crosses the border: an RTP header extension on every link packet.

In the style of EUROCAE ED-137B (radio over IP), every RTP packet a link sends
says whether the sending side is keyed, at which priority, whether it is an
emergency, whether a receiver's squelch is open, and which *over* (talk burst)
it belongs to — so the far side's floor, console, audit and MQTT name the real
talker, not "the link". A peer without it (plain BSI-Core 1.1) still works: its
packets carry no extension and it is keyed by voice activity.

On the wire (RFC 8285 header extension, negotiated in SDP as
``a=extmap:1 urn:borderlink:talker site=SITE_ID`` with ``a=extmap-allow-mixed``,
see :mod:`gateway.links.onair`): one element, two-byte form (profile ``0x1000``),
ID 1 unless SDP says otherwise::

    byte 0    vv k s e ppp   version (0), keyed, squelch open, emergency, priority 0-7
    byte 1    talker ID      one per over, 1-255 cycling (0: nobody yet)
    bytes 2-5 key-up time    sender's UTC milliseconds mod 2^32, for "earliest key-up"

No label: under SRTP a header extension is authenticated but not encrypted (RFC
3711), and pylibsrtp offers neither RFC 6904 header encryption nor cryptex (RFC
9335), so anyone on the path between the gateways would read which units of which
agency talk, and when. Only what the shared floor needs on every packet travels
here; the label (``RCMP · Marine 7``) goes once per over, keyed by talker ID and
key-up time, in the link dialog over its TLS connection
(:mod:`gateway.links.labels`). The element is exactly :data:`SIZE` bytes.

Everything received is hostile: :func:`decode` and :func:`read` return a
:class:`Rejected` with a reason from a fixed set (a metrics label) and never raise.
"""

from __future__ import annotations

import struct
import unicodedata
from dataclasses import dataclass
from typing import Literal, get_args

URI = "urn:borderlink:talker"
DEFAULT_ID = 1
ONE_BYTE = 0xBEDE  # RFC 8285 §4.2 profile of the one-byte form
TWO_BYTE = 0x1000  # RFC 8285 §4.3: 0x100 and four "appbits" (we send 0)
MAX_LABEL_BYTES = 64  # a talker label (sent in the dialog, never in RTP)
VERSION = 0

_HEADER = struct.Struct("!HH")  # profile, length in 32-bit words
_FIXED = struct.Struct("!BBI")  # flags, talker ID, key-up ms
SIZE = _FIXED.size
_RTP = struct.Struct("!BBHII")

Reason = Literal[
    "truncated",  # shorter than its own header or length says
    "profile",  # not an RFC 8285 header extension
    "element",  # an element runs past the end of the extension, or is not SIZE bytes
    "absent",  # an extension with no elements at all
    "unknown_id",  # elements, but none with our negotiated ID
    "duplicate_id",  # our ID twice in one packet: which one to believe?
    "version",  # a talker element of a version we do not read
    "rtp",  # not an RTP version 2 packet
    # a label in the link dialog (gateway.links.labels):
    "label_too_long",  # label over MAX_LABEL_BYTES
    "label_text",  # label not UTF-8, or with control characters
    "info",  # a label message without a talker ID and key-up time, or not ours
    "stranger",  # a label message from anyone but the link's verified peer
    "flood",  # more label messages than a peer may send (labels.RATE)
]
REASONS: tuple[Reason, ...] = get_args(Reason)


@dataclass(frozen=True, slots=True)
class Talker:
    """What one packet says about who is talking on the sending side."""

    keyed: bool  # PTT: the sending side has a talker on the air
    talker_id: int = 0  # 1-255, new for each over; 0: nobody yet
    keyed_at: int = 0  # key-up time, sender's UTC ms mod 2^32 (see unwrap_ms)
    priority: int = 0  # 0-7, higher pre-empts in a single floor
    emergency: bool = False
    squelch: bool = False  # a receiver's squelch (COR) is open: radio audio

    def __post_init__(self) -> None:
        if not 0 <= self.priority <= 7:
            raise ValueError(f"priority is 0-7 on the wire, not {self.priority}")
        if not 0 <= self.talker_id <= 255:
            raise ValueError(f"talker_id is 0-255, not {self.talker_id}")


@dataclass(frozen=True, slots=True)
class Rejected:
    """A received extension we will not believe; count ``reason`` and carry on."""

    reason: Reason


def fit_label(text: str) -> str:
    """A label that goes on the wire: control characters dropped, at most 64 bytes of UTF-8
    (cut between characters)."""
    clean = "".join(c for c in text if not unicodedata.category(c).startswith("C"))
    data = clean.encode("utf-8")[:MAX_LABEL_BYTES]
    return data.decode("utf-8", errors="ignore").strip()


def wire_priority(priority: int) -> int:
    """An engine floor priority (radios 0, dispatchers 10, emergencies 100) in 0-7."""
    return max(0, min(7, priority))


def unwrap_ms(wrapped: int, now_ms: int) -> int:
    """A key-up time from the wire (ms mod 2^32) as full ms, the one nearest ``now_ms``.

    Both sides' clocks are NTP-synchronised to well under 2^31 ms (24 days), so
    each side unwraps a peer's stamp to the same number.
    """
    delta = (wrapped - now_ms) & 0xFFFFFFFF
    if delta >= 1 << 31:
        delta -= 1 << 32
    return now_ms + delta


def encode(talker: Talker, ext_id: int = DEFAULT_ID) -> bytes:
    """The header-extension block (profile, length, element, padding) for one packet."""
    if not 1 <= ext_id <= 255:
        raise ValueError(f"extension ID {ext_id} is not 1-255")
    flags = (
        VERSION << 6
        | talker.keyed << 5
        | talker.squelch << 4
        | talker.emergency << 3
        | talker.priority
    )
    data = _FIXED.pack(flags, talker.talker_id, talker.keyed_at & 0xFFFFFFFF)
    element = bytes((ext_id, len(data))) + data
    element += bytes(-len(element) % 4)
    return _HEADER.pack(TWO_BYTE, len(element) // 4) + element


def decode(block: bytes, ext_id: int = DEFAULT_ID) -> Talker | Rejected:
    """The talker in a header-extension block (exactly as it sits in the packet)."""
    if len(block) < _HEADER.size:
        return Rejected("truncated")
    profile, words = _HEADER.unpack_from(block)
    if len(block) != _HEADER.size + 4 * words:
        return Rejected("truncated")
    if profile == ONE_BYTE:
        elements = _one_byte_elements(memoryview(block)[_HEADER.size :])
    elif profile & 0xFFF0 == TWO_BYTE:
        elements = _two_byte_elements(memoryview(block)[_HEADER.size :])
    else:
        return Rejected("profile")
    if isinstance(elements, Rejected):
        return elements
    ours = [data for number, data in elements if number == ext_id]
    if not ours:
        return Rejected("unknown_id" if elements else "absent")
    if len(ours) > 1:
        return Rejected("duplicate_id")
    return _talker(bytes(ours[0]))


def _one_byte_elements(data: memoryview) -> list[tuple[int, memoryview]] | Rejected:
    elements = []
    i = 0
    while i < len(data):
        number, length = data[i] >> 4, (data[i] & 0x0F) + 1
        if data[i] == 0:  # padding
            i += 1
            continue
        if number == 15:  # reserved: stop reading this extension (RFC 8285 §4.2)
            break
        if i + 1 + length > len(data):
            return Rejected("element")
        elements.append((number, data[i + 1 : i + 1 + length]))
        i += 1 + length
    return elements


def _two_byte_elements(data: memoryview) -> list[tuple[int, memoryview]] | Rejected:
    elements = []
    i = 0
    while i < len(data):
        if data[i] == 0:  # padding
            i += 1
            continue
        if i + 2 > len(data) or i + 2 + data[i + 1] > len(data):
            return Rejected("element")
        number, length = data[i], data[i + 1]
        elements.append((number, data[i + 2 : i + 2 + length]))
        i += 2 + length
    return elements


def _talker(data: bytes) -> Talker | Rejected:
    if len(data) != SIZE:
        return Rejected("element")
    flags, talker_id, keyed_at = _FIXED.unpack_from(data)
    if flags >> 6 != VERSION:
        return Rejected("version")
    return Talker(
        keyed=bool(flags & 0x20),
        talker_id=talker_id,
        keyed_at=keyed_at,
        priority=flags & 0x07,
        emergency=bool(flags & 0x08),
        squelch=bool(flags & 0x10),
    )


# --- in an RTP packet -------------------------------------------------------------


def extension_block(packet: bytes) -> bytes | None | Rejected:
    """The header-extension block of an RTP packet; None when it has none (X bit clear)."""
    if len(packet) < _RTP.size or packet[0] >> 6 != 2:
        return Rejected("rtp")
    if not packet[0] & 0x10:
        return None
    start = _RTP.size + 4 * (packet[0] & 0x0F)
    if len(packet) < start + _HEADER.size:
        return Rejected("truncated")
    end = start + _HEADER.size + 4 * int.from_bytes(packet[start + 2 : start + 4], "big")
    if len(packet) < end:
        return Rejected("truncated")
    return bytes(packet[start:end])


def read(packet: bytes, ext_id: int = DEFAULT_ID) -> Talker | None | Rejected:
    """The talker of a received RTP packet (after SRTP); None: no extension (plain peer)."""
    block = extension_block(packet)
    if block is None or isinstance(block, Rejected):
        return block
    return decode(block, ext_id)


def attach(packet: bytes, block: bytes) -> bytes:
    """An RTP packet of ours (no extension yet) with this block after its CSRCs, X bit set."""
    if packet[0] & 0x10:
        raise ValueError("the packet already has a header extension")
    start = _RTP.size + 4 * (packet[0] & 0x0F)
    return bytes((packet[0] | 0x10,)) + packet[1:start] + block + packet[start:]


# --- both ends of one link dialog ----------------------------------------------------


class Announcer:
    """The sending side of one link dialog: numbers overs.

    A new over starts at key-up, or when the talker changes without a gap (the
    label differs); priority and emergency may change inside an over (an
    emergency button pressed while talking). ``label`` is the current over's, for
    the one message that names it in the dialog.
    """

    def __init__(self) -> None:
        self.talker_id = 0
        self.keyed_at = 0
        self.label = ""
        self._keyed = False

    def stamp(
        self,
        keyed: bool,
        now_ms: int,
        label: str = "",
        priority: int = 0,
        emergency: bool = False,
        squelch: bool = False,
        keyed_at: int | None = None,
        talker_id: int | None = None,
    ) -> Talker:
        """What the next packet says (``priority`` already 0-7: see :func:`wire_priority`).

        ``keyed_at``: the talker's own key-up time (UTC ms), which the shared floor
        compares on both sides; a different one starts a new over. Default: now, at
        the first keyed packet. ``talker_id``: a relay passes on the origin's (default:
        this side numbers its overs)."""
        label = fit_label(label)
        wire_at = None if keyed_at is None else keyed_at & 0xFFFFFFFF
        if keyed and (
            not self._keyed
            or label != self.label
            or (wire_at is not None and wire_at != self.keyed_at)
            or (talker_id is not None and talker_id != self.talker_id)
        ):
            self.talker_id = talker_id or self.talker_id % 255 + 1
            self.keyed_at = (now_ms if wire_at is None else wire_at) & 0xFFFFFFFF
            self.label = label
        self._keyed = keyed
        return Talker(
            keyed=keyed,
            talker_id=self.talker_id,
            keyed_at=self.keyed_at,
            priority=priority,
            emergency=emergency,
            squelch=squelch,
        )


class Listener:
    """The receiving side of one link dialog: reads each packet's block."""

    def __init__(self, ext_id: int = DEFAULT_ID) -> None:
        self.ext_id = ext_id
        self._last: tuple[bytes, Talker | Rejected] | None = None

    def read(self, block: bytes) -> Talker | Rejected:
        """:func:`decode` for one packet's extension block.

        The sender repeats the same bytes on every packet of an over, so an
        unchanged block costs one comparison, not a decode (about 10 µs in Python;
        100 talking dialogs send 5000 packets/s).
        """
        if self._last is not None and self._last[0] == block:
            return self._last[1]
        result = decode(block, self.ext_id)
        self._last = (block, result)
        return result
