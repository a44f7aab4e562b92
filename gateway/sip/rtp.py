"""RTP (RFC 3550) and telephone-events (RFC 4733): packet layout and per-stream receive stats.

Only what a G.711 voice leg needs, and nothing that trusts the network: every
field of a received packet is checked before it touches the jitter buffer, and
anything that fails is counted as malformed and dropped (never raised), so a
scanner or a broken phone cannot disturb the calls that work.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTP_VERSION = 2
HEADER = struct.Struct("!BBHII")  # V/P/X/CC, M/PT, sequence, timestamp, SSRC
EVENT = struct.Struct("!BBH")  # event, E/R/volume, duration (RFC 4733 §2.3)
MAX_PACKET = 1500  # anything bigger is not a voice packet from a sane peer
MAX_PAYLOAD_SAMPLES = 1200  # 150 ms of G.711 (maxptime we advertise)

PCMU = 0
PCMA = 8
OPUS = 111  # links between BorderLinks (gateway.sip.opus)
CODEC_NAMES = {PCMU: "PCMU", PCMA: "PCMA", OPUS: "opus"}
DTMF_EVENTS = "0123456789*#ABCD"


@dataclass(slots=True)
class RtpPacket:
    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    payload: memoryview


def parse_rtp(data: bytes) -> RtpPacket | None:
    """A checked packet, or None when it is not valid RTP version 2 (caller counts it).

    Checks: length, version, CSRC list and header extension inside the packet,
    padding length sane, payload non-empty and not absurdly long.
    """
    size = len(data)
    if size < HEADER.size or size > MAX_PACKET:
        return None
    b0, b1, seq, ts, ssrc = HEADER.unpack_from(data)
    if b0 >> 6 != RTP_VERSION:
        return None
    start = HEADER.size + 4 * (b0 & 0x0F)
    if b0 & 0x10:  # header extension: 16-bit profile, 16-bit length in words
        if size < start + 4:
            return None
        start += 4 + 4 * int.from_bytes(data[start + 2 : start + 4], "big")
    end = size
    if b0 & 0x20:  # padding: last octet says how many to drop
        end -= data[-1]
    if end <= start or data[-1] == 0 and b0 & 0x20:
        return None
    return RtpPacket(b1 & 0x7F, bool(b1 & 0x80), seq, ts, ssrc, memoryview(data)[start:end])


def build_header(
    payload_type: int, marker: bool, sequence: int, timestamp: int, ssrc: int
) -> bytes:
    return HEADER.pack(
        0x80,
        (0x80 if marker else 0) | payload_type,
        sequence & 0xFFFF,
        timestamp & 0xFFFFFFFF,
        ssrc,
    )


@dataclass(slots=True)
class DtmfEvent:
    digit: str
    end: bool
    duration: int  # in timestamp units


def parse_event(payload: memoryview) -> DtmfEvent | None:
    """An RFC 4733 DTMF event, or None (malformed, or an event that is not a DTMF key)."""
    if len(payload) < EVENT.size:
        return None
    event, flags, duration = EVENT.unpack_from(payload)
    if event >= len(DTMF_EVENTS):
        return None
    return DtmfEvent(DTMF_EVENTS[event], bool(flags & 0x80), duration)


def build_event(digit: str, end: bool, duration: int, volume: int = 10) -> bytes:
    return EVENT.pack(DTMF_EVENTS.index(digit), (0x80 if end else 0) | (volume & 0x3F), duration)


class ReceiveStats:
    """Sequence extension, loss and interarrival jitter for one RTP source (RFC 3550 A.1, A.8).

    A new SSRC (phone restarted its stream, a PBX re-INVITE to another media
    server) restarts the sequence bookkeeping; counters keep growing.
    """

    __slots__ = (
        "ssrc",
        "base_seq",
        "max_seq",
        "cycles",
        "received",
        "jitter",
        "_transit",
        "lost_before",
    )

    def __init__(self) -> None:
        self.ssrc: int | None = None
        self.lost_before = 0  # loss counted on earlier SSRCs
        self._restart(0)

    def _restart(self, seq: int) -> None:
        self.base_seq = seq
        self.max_seq = seq
        self.cycles = 0
        self.received = 0
        self.jitter = 0.0  # in timestamp units
        self._transit: float | None = None

    def update(self, ssrc: int, seq: int, timestamp: int, arrival_units: float) -> bool:
        """Account one packet; returns True when the SSRC changed (the caller resyncs)."""
        changed = ssrc != self.ssrc
        if changed:
            if self.ssrc is not None:
                self.lost_before += self.lost
            self.ssrc = ssrc
            self._restart(seq)
        else:
            delta = (seq - self.max_seq) & 0xFFFF
            if delta < 0x8000:
                if seq < self.max_seq:
                    self.cycles += 0x10000
                self.max_seq = seq
            elif delta > 0xFFFF - 3000 and self.received == 0:  # pragma: no cover - defensive
                self.max_seq = seq
        self.received += 1
        transit = arrival_units - timestamp
        if self._transit is not None:
            d = abs(transit - self._transit)
            if d < 1 << 30:  # a timestamp jump (new talkspurt base) is not jitter
                self.jitter += (d - self.jitter) / 16.0
        self._transit = transit
        return changed

    @property
    def expected(self) -> int:
        if self.ssrc is None:
            return 0
        return self.cycles + self.max_seq - self.base_seq + 1

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.received)
