"""RTCP (RFC 3550 §6): the sender/receiver reports each leg sends, and the ones it reads.

Why: a PBX or phone watching a call wants our view of its stream (loss, jitter)
and we want the round-trip time, which only the LSR/DLSR echo gives (§6.4.1).
Reports are small and rare (one per leg every few seconds), so plain ``struct``
per packet is fine here. Every compound packet we send is SR (we always send
audio) or RR, then SDES with a CNAME, as §6.1 requires. Anything received that
does not parse as RTCP version 2 with lengths inside the datagram is refused
(``None``) for the caller to count.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

NTP_OFFSET = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix)
SR = 200
RR = 201
SDES = 202
CNAME = 1
_HEAD = struct.Struct("!BBHI")  # V/P/RC, PT, length in words - 1, SSRC
_SENDER = struct.Struct("!IIIII")  # NTP msw, lsw, RTP timestamp, packets, octets
_BLOCK = struct.Struct("!IIIIII")  # SSRC, fraction+lost, highest seq, jitter, LSR, DLSR


def is_rtcp(second_octet: int) -> bool:
    """RFC 5761 §4: on a multiplexed port, 192–223 in the second octet is RTCP."""
    return 192 <= second_octet <= 223


def ntp_now(now: float | None = None) -> int:
    """Wall time as a 64-bit NTP timestamp."""
    t = time.time() if now is None else now
    return int((t + NTP_OFFSET) * (1 << 32)) & 0xFFFFFFFFFFFFFFFF


def middle32(ntp: int) -> int:
    """The middle 32 bits of an NTP timestamp (LSR, DLSR and RTT arithmetic unit: 1/65536 s)."""
    return (ntp >> 16) & 0xFFFFFFFF


@dataclass(frozen=True)
class ReportBlock:
    ssrc: int
    fraction_lost: int  # 0..255, of 256
    cumulative_lost: int
    highest_seq: int  # extended
    jitter: int  # timestamp units
    lsr: int
    dlsr: int  # 1/65536 s


@dataclass(frozen=True)
class Report:
    kind: int  # SR or RR
    ssrc: int  # the sender of the report
    ntp: int | None  # SR only
    rtp_timestamp: int | None
    packets: int | None
    octets: int | None
    blocks: tuple[ReportBlock, ...]


def build_report(
    ssrc: int,
    cname: str,
    sender: tuple[int, int, int, int] | None,
    block: ReportBlock | None,
) -> bytes:
    """A compound SR (``sender`` = ntp, rtp timestamp, packets, octets) or RR, plus SDES."""
    blocks = b""
    if block is not None:
        lost = max(-(1 << 23), min(block.cumulative_lost, (1 << 23) - 1)) & 0xFFFFFF
        blocks = _BLOCK.pack(
            block.ssrc,
            (block.fraction_lost & 0xFF) << 24 | lost,
            block.highest_seq & 0xFFFFFFFF,
            block.jitter & 0xFFFFFFFF,
            block.lsr & 0xFFFFFFFF,
            block.dlsr & 0xFFFFFFFF,
        )
    count = 1 if block is not None else 0
    if sender is not None:
        ntp, rtp_ts, packets, octets = sender
        body = (
            _SENDER.pack(
                ntp >> 32,
                ntp & 0xFFFFFFFF,
                rtp_ts & 0xFFFFFFFF,
                packets & 0xFFFFFFFF,
                octets & 0xFFFFFFFF,
            )
            + blocks
        )
        kind = SR
    else:
        body, kind = blocks, RR
    report = _HEAD.pack(0x80 | count, kind, (4 + len(body)) // 4, ssrc) + body
    text = cname.encode()[:255]
    chunk = struct.pack("!IBB", ssrc, CNAME, len(text)) + text + b"\x00"
    chunk += b"\x00" * (-len(chunk) % 4)
    sdes = struct.pack("!BBH", 0x81, SDES, len(chunk) // 4) + chunk
    return report + sdes


def parse_compound(data: bytes) -> list[Report] | None:
    """The SR/RR reports of a compound packet (other types skipped), or None if malformed."""
    reports: list[Report] = []
    offset, size = 0, len(data)
    if size < 8:
        return None
    while offset < size:
        if size - offset < 4:
            return None
        first, kind, words = struct.unpack_from("!BBH", data, offset)
        length = 4 * (words + 1)
        if first >> 6 != 2 or offset + length > size or not is_rtcp(kind):
            return None
        count = first & 0x1F
        at = offset + 8
        if kind in (SR, RR):
            if length < 8:
                return None
            ssrc = struct.unpack_from("!I", data, offset + 4)[0]
            sender = None
            if kind == SR:
                if length < 28:
                    return None
                sender = _SENDER.unpack_from(data, at)
                at += _SENDER.size
            if at + count * _BLOCK.size > offset + length:
                return None
            blocks = []
            for _ in range(count):
                b_ssrc, lost_word, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(data, at)
                lost = lost_word & 0xFFFFFF
                if lost & 0x800000:
                    lost -= 1 << 24
                blocks.append(
                    ReportBlock(b_ssrc, lost_word >> 24, lost, highest, jitter, lsr, dlsr)
                )
                at += _BLOCK.size
            reports.append(
                Report(
                    kind,
                    ssrc,
                    (sender[0] << 32 | sender[1]) if sender else None,
                    sender[2] if sender else None,
                    sender[3] if sender else None,
                    sender[4] if sender else None,
                    tuple(blocks),
                )
            )
        offset += length
    if not reports:
        return None  # §6.1: a compound packet starts with SR or RR
    return reports


# Peers count DLSR coarsely: libre (baresip) in whole milliseconds of its timer, so on a
# short path A - LSR - DLSR comes out up to 1 ms below zero about half the time. Such a
# round trip is 0 (as libre itself clamps it); only a larger negative is a clock step.
DLSR_SLACK = int(0.005 * 65536)


@dataclass
class RtcpState:
    """One leg's RTCP: where reports go, the last SR heard, and what the far end told us."""

    remote: tuple[str, int] | None  # the peer's RTCP address (RTP port + 1, a=rtcp, or latched)
    mux: bool = False  # RTCP shares the RTP port (a=rtcp-mux)
    latched: bool = False
    last_sr: int = 0  # middle 32 bits of the NTP time of the last SR received
    last_sr_at: float = 0.0  # when it arrived (wall time)
    rtt: float | None = None  # seconds, from the far end's LSR/DLSR echo
    remote_lost: int = 0  # what the far end reports of our stream
    remote_jitter: int = 0  # timestamp units
    reports_in: int = 0
    reports_out: int = 0

    def dlsr(self, now: float) -> int:
        if not self.last_sr:
            return 0
        return int((now - self.last_sr_at) * 65536) & 0xFFFFFFFF

    def heard(self, report: Report, our_ssrc: int, now: float) -> None:
        """Take in one SR/RR from the peer: remember its SR time, read its block about us."""
        self.reports_in += 1
        if report.ntp is not None:
            self.last_sr = middle32(report.ntp)
            self.last_sr_at = now
        for block in report.blocks:
            if block.ssrc != our_ssrc:
                continue
            self.remote_lost = block.cumulative_lost
            self.remote_jitter = block.jitter
            if block.lsr:
                rtt = (middle32(ntp_now(now)) - block.lsr - block.dlsr) & 0xFFFFFFFF
                if rtt >= 1 << 31:
                    rtt -= 1 << 32
                if rtt >= -DLSR_SLACK:  # slightly below zero: the peer's coarse DLSR
                    self.rtt = max(rtt, 0) / 65536.0
                # further below is a clock step, not a measurement: keep the last one
