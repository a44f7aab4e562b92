"""A console's outgoing RTP, sent without aiortc's per-packet sender task.

aiortc's sender spends ~100 µs of Python per packet (a task wake-up, packet
objects, header extensions, three awaits down to the socket). With one shared
Opus encode per talkgroup that path was the whole per-listener cost, so the
console bank sends each listener's packet itself: a 12-byte header, the SRTP
session aiortc negotiated, and a plain non-blocking ``sendto`` on the nominated
ICE pair's socket. SRTP protection stays per listener (keys differ); everything
else that can be looked up once is looked up once per call, not per packet.

It reaches into aiortc 1.x (the DTLS transport's SRTP session, aioice's
nominated pair); :meth:`RtpOut.available` says whether those exist, and the
console falls back to aiortc's own sender when they do not.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import struct
from typing import Any

from aiortc.clock import current_ntp_time
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtp import RtcpByePacket

try:  # the C library under pylibsrtp: protect in place, no Python wrapper per packet
    from pylibsrtp._binding import ffi as _ffi
    from pylibsrtp._binding import lib as _lib
except ImportError:  # pragma: no cover - a pylibsrtp without the cffi binding
    _ffi = _lib = None

HEADER = struct.Struct("!BBHII")  # V=2 P=0 X=0 CC=0 | M PT | sequence | timestamp | SSRC
MAX_PACKET = 1200  # bytes before SRTP's tag; Opus at 32 kbit/s is ~80
REPORT_SECONDS = 1.0  # RTCP sender report interval (aiortc's is 0.5-1.5 s)
# RFC 3550 6.4.1 sender report without report blocks: V=2 RC=0 | PT=200 | length 6 |
# SSRC | NTP seconds | NTP fraction | RTP timestamp | packet count | octet count
SENDER_REPORT = struct.Struct("!BBHIQIII")


def sdes_cname(ssrc: int, cname: str) -> bytes:
    """RFC 3550 6.5 SDES packet with one chunk holding the CNAME (built once per stream)."""
    text = cname.encode()[:255]
    chunk = struct.pack("!IBB", ssrc, 1, len(text)) + text + b"\0"
    chunk += b"\0" * (-len(chunk) % 4)
    return struct.pack("!BBH", 0x81, 202, len(chunk) // 4) + chunk


class _InPlaceProtect:
    """SRTP-protect into our own C buffer with libsrtp 2's ``srtp_protect(ctx, buf, len*)``,
    the call pylibsrtp makes, minus its per-packet allocation and copies (~1 µs a packet).
    The session object is kept alive so its context is never freed under us."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.ctx = session._srtp[0]
        self.cdata = _ffi.new("char[]", MAX_PACKET + 64)
        self.buffer = _ffi.buffer(self.cdata)
        self.view = memoryview(self.buffer)
        self.length = _ffi.new("int *")

    @staticmethod
    def usable(session: Any) -> bool:
        return _lib is not None and hasattr(session, "_srtp") and hasattr(_lib, "srtp_protect")


class RtpOut:
    """One console's RTP stream to the browser: sequence, timestamp, SSRC and the wire."""

    def __init__(self, sender: Any, payload_type: int, samples_per_packet: int) -> None:
        self.sender = sender
        self.dtls = sender.transport
        self.payload_type = payload_type & 0x7F
        self.samples = samples_per_packet
        self.ssrc = int(sender._ssrc)
        self.sequence = secrets.randbelow(1 << 16)
        self.timestamp = secrets.randbelow(1 << 32)
        self.packets = 0
        self.bytes = 0
        self.dropped = 0  # before DTLS was up, or the socket refused (full, closed)
        self.skipped = 0  # frames of silence not sent (DTX)
        self._marker = 0  # 0x80 on the first packet after a DTX gap (RFC 3551 4.1)
        # Resolved once DTLS is connected (see _resolve).
        self._protect: Any = None
        self._srtp: Any = None
        self._inplace: _InPlaceProtect | None = None
        self._sendto: Any = None
        self._addr: tuple[str, int] | None = None
        self._pair: Any = None
        self._sock: socket.socket | None = None
        self._sdes = b""
        self._reports = False  # True once we send the RTCP reports instead of aiortc
        self.reports = 0
        self.closed = False

    @staticmethod
    def available(sender: Any) -> bool:
        dtls = getattr(sender, "transport", None)
        ice = getattr(dtls, "transport", None)
        return (
            hasattr(dtls, "_tx_srtp")
            and hasattr(dtls, "_state")
            and isinstance(getattr(getattr(ice, "_connection", None), "_nominated", None), dict)
            and isinstance(getattr(sender, "_ssrc", None), int)
        )

    def _resolve(self) -> bool:
        """Find the SRTP session and the nominated pair's socket, once DTLS is up."""
        dtls = self.dtls
        srtp = getattr(dtls, "_tx_srtp", None)
        pair = dtls.transport._connection._nominated.get(1)
        transport = getattr(getattr(pair, "protocol", None), "transport", None)
        if dtls._state is not DtlsState.CONNECTED or srtp is None or transport is None:
            return False
        raw = transport.get_extra_info("socket")
        if raw is None:
            return False
        # Our own descriptor for the same socket: a plain non-blocking sendto, no
        # transport object in between. Closed with the console (close()).
        self._sock = socket.socket(fileno=os.dup(raw.fileno()))
        self._sock.setblocking(False)
        self._srtp = srtp
        self._protect = srtp.protect
        self._inplace = _InPlaceProtect(srtp) if _InPlaceProtect.usable(srtp) else None
        self._sendto = self._sock.sendto
        self._addr = pair.remote_addr
        self._pair = pair
        cname = getattr(self.sender, "_RTCRtpSender__cname", None)
        self._sdes = sdes_cname(self.ssrc, cname) if isinstance(cname, str) else b""
        return True

    def _take_over_reports(self) -> bool:
        """Stop aiortc's per-sender RTCP task; the bank sends our reports instead.

        Its reports would be wrong anyway (it never sees our packets: counts and
        RTP timestamp stay 0), and its task wake-up, packet objects and send path
        cost about as much per console as the media itself. Cancelling it makes
        it send an RTCP BYE, which would tell the browser the stream ended; that
        one call is swallowed, and we send the BYE when the console closes.

        Only a task that has started is cancelled: one cancelled before its first
        step would never signal its exit, and closing the call would wait forever.
        """
        task = getattr(self.sender, "_RTCRtpSender__rtcp_task", None)
        started = getattr(self.sender, "_RTCRtpSender__rtcp_started", None)
        if (
            task is None
            or task.done()
            or not hasattr(self.sender, "_send_rtcp")
            or not isinstance(started, asyncio.Event)
            or not started.is_set()
        ):
            return False
        sender = self.sender

        async def no_bye(packets: list[Any]) -> None:
            return None

        def restore(_: Any) -> None:
            if sender.__dict__.get("_send_rtcp") is no_bye:
                del sender._send_rtcp

        sender._send_rtcp = no_bye  # an instance attribute shadows the method
        task.add_done_callback(restore)
        task.cancel()
        return True

    def send(self, payload: bytes) -> None:
        """Packetise, protect and send one Opus packet (or drop it and count)."""
        if self._sendto is None and (self.closed or not self._resolve()):
            self.dropped += 1
            return
        if self.dtls._state is not DtlsState.CONNECTED:
            self.dropped += 1
            return
        inplace = self._inplace
        size = 12 + len(payload)
        if inplace is not None and size <= MAX_PACKET:
            buffer, length = inplace.buffer, inplace.length
            HEADER.pack_into(
                buffer,
                0,
                0x80,
                self._marker | self.payload_type,
                self.sequence,
                self.timestamp,
                self.ssrc,
            )
            buffer[12:size] = payload
            length[0] = size
            if _lib.srtp_protect(inplace.ctx, inplace.cdata, length) != 0:
                self.dropped += 1  # libsrtp refused (key expired): drop, as aiortc would raise
                return
            data: Any = inplace.view[: length[0]]
        else:
            data = self._protect(
                HEADER.pack(
                    0x80, self._marker | self.payload_type, self.sequence, self.timestamp, self.ssrc
                )
                + payload
            )
        self.sequence = (self.sequence + 1) & 0xFFFF
        self.timestamp = (self.timestamp + self.samples) & 0xFFFFFFFF
        self._marker = 0
        try:
            self._sendto(data, self._addr)
        except OSError:  # socket buffer full (drop, as UDP would) or closed under us
            self.dropped += 1
            return
        self.packets += 1
        self.bytes += len(payload)

    def skip(self) -> None:
        """A frame of silence not sent (DTX): time moves on, the sequence does not, so
        the browser sees a pause, not a loss; the next packet carries the marker bit."""
        self.timestamp = (self.timestamp + self.samples) & 0xFFFFFFFF
        self._marker = 0x80
        self.skipped += 1

    def report(self) -> None:
        """An RTCP sender report (and CNAME) for this stream, if we took over RTCP.

        The RTP timestamp is the last packet's: reports are sent right after a
        tick's packets, so it is within a millisecond of the NTP time beside it.
        """
        if self._sendto is None:
            return
        if not self._reports:
            self._reports = self._take_over_reports()  # aiortc reports until then
            return
        report = SENDER_REPORT.pack(
            0x80,
            200,
            6,
            self.ssrc,
            current_ntp_time(),
            (self.timestamp - self.samples) & 0xFFFFFFFF,
            self.packets & 0xFFFFFFFF,
            self.bytes & 0xFFFFFFFF,
        )
        self._send_rtcp(report + self._sdes)
        self.reports += 1

    def _send_rtcp(self, data: bytes) -> None:
        if self.dtls._state is not DtlsState.CONNECTED:
            return
        try:
            self._sendto(self._srtp.protect_rtcp(data), self._addr)
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        if self._reports and self._sendto is not None:  # the goodbye aiortc would have sent
            self._send_rtcp(bytes(RtcpByePacket(sources=[self.ssrc])))
        self.closed = True
        self._sendto = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
