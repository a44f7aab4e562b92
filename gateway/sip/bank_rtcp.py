"""The leg bank's RTCP (RFC 3550 §6): each leg's sender reports out, the far end's reports in.

Reports are rare — one per leg every ``rtcp_interval`` (5 s), spread evenly over the
ticks — so they are built and parsed one at a time (:mod:`gateway.sip.rtcp` holds the
packet format). They travel on the RTCP socket (RTP port + 1), or on the RTP port
itself when the call agreed to ``a=rtcp-mux`` (RFC 5761; the receive path hands
those over). Reports read off the RTCP port keep their kernel arrival time, so the
round trip measured from the far end's LSR/DLSR echo does not include our tick.
Calls with SRTP send and expect SRTCP (RFC 3711 §3.4), with the call's keys.

Interarrival jitter travels in the units of the stream's RTP clock (RFC 3550
§6.4.1): 8 kHz for G.711, 48 kHz for Opus (RFC 7587 §4.1), whatever rate we decode
at. The receive statistics keep every leg's time in 8 kHz units, so an Opus leg's
jitter is scaled up on the way out, and the peer's figure about our stream is
read in the leg's own clock (:meth:`RtcpReports.rtp_clock`).
"""

from __future__ import annotations

import socket
import struct
import time

import numpy as np

from gateway.sip.bank_srtp import SrtpEdges
from gateway.sip.legtable import CODEC_RATE, LegTable
from gateway.sip.mmsg import SO_TIMESTAMPNS, address_key, key_address
from gateway.sip.opus import CLOCK as OPUS_CLOCK
from gateway.sip.rtcp import ReportBlock, build_report, ntp_now, parse_compound
from gateway.sip.streams import NO_SSRC, StreamBank

RTCP_INTERVAL = 5.0  # seconds between one leg's reports (RFC 3550 §6.2: 5 s minimum)
_STAMP_SPACE = socket.CMSG_SPACE(16)


class RtcpReports:
    """Part of :class:`gateway.sip.bank.LegBank`: every leg's RTCP.

    Per leg it lives in ``LegMedia.rtcp``; of the table it reads the rows' addresses,
    SSRCs and send counters and its index (``rows_at``), and counts what it drops.
    Reports multiplexed on the RTP port arrive through :meth:`received` from the
    receive part; an SRTP call's reports are SRTCP (``srtp_edges``)."""

    def __init__(
        self,
        table: LegTable,
        streams: StreamBank,
        srtp_edges: SrtpEdges,
        rtp_sock: socket.socket,
        sock: socket.socket,
        ticks: int,
        cname: str,
    ) -> None:
        """``sock``: the RTCP socket (made non-blocking, kernel timestamps); a report every
        ``ticks``; ``rtp_sock`` carries the reports of calls with rtcp-mux."""
        self.table = table
        self.streams = streams
        self.srtp_edges = srtp_edges
        self.rtp_sock = rtp_sock
        self.rtcp_sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.rtcp_ticks = ticks
        self.cname = cname
        self.rtcp_source: dict[int, list[int]] = {}  # peer RTCP address key → its rows

    def rtp_clock(self, rows: np.ndarray | int) -> np.ndarray:
        """Each leg's RTP clock rate in Hz: its timestamps, and the jitter in its reports,
        count in it."""
        return np.where(self.table.opus[rows], OPUS_CLOCK, CODEC_RATE)

    def set_remote(self, row: int, address: tuple[str, int] | None) -> None:
        """Where the leg's reports go (and whose reports are the leg's)."""
        media = self.table.media[row]
        assert media is not None
        old = media.rtcp.remote
        if old is not None:
            rows = self.rtcp_source.get(address_key(*old), [])
            if row in rows:
                rows.remove(row)
            if not rows:
                self.rtcp_source.pop(address_key(*old), None)
        media.rtcp.remote = address
        if address is not None:
            self.rtcp_source.setdefault(address_key(*address), []).append(row)

    # --- in ---------------------------------------------------------------------------

    def drain(self) -> None:
        """Reports on the RTCP port: a few per second per hundred legs, read one by one,
        each with its kernel arrival time (the round trip must not include our tick).

        At most a few per call per tick: a flood on this port waits in (and overflows)
        the socket buffer instead of stretching the tick."""
        for _ in range(64 + 2 * len(self.table.active)):
            try:
                data, ancillary, _, source = self.rtcp_sock.recvmsg(2048, _STAMP_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP unreachable from a phone that went away
                continue
            arrival = None
            for level, kind, blob in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(blob) >= 16:
                    sec, nsec = struct.unpack_from("@qq", blob)
                    arrival = sec + nsec * 1e-9
            self.received(data, address_key(*source[:2]), None, arrival)

    def received(
        self, data: bytes, key: int, row: int | None, arrival: float | None = None
    ) -> None:
        """One compound RTCP packet from ``key`` (``row`` known when it came on the RTP port)."""
        t = self.table
        if row is None and t.srtp_legs:  # the RTCP port: an SRTP call's reports are SRTCP
            data = self._srtcp_in(data, key)
            if data is None:
                return
        reports = parse_compound(data)
        if reports is None:
            t.count("rtcp", np.array([row]) if row is not None and row >= 0 else None)
            return
        if row is None or row < 0:
            stray = row is not None  # came on the RTP port from nobody's address
            row = self._rtcp_row(key, reports[0].ssrc)
            if row < 0:
                return
            if stray and t.srtp[row]:  # not checked with the call's key: not the call's
                t.count("srtp_auth", np.array([row]))
                return
        media = t.media[row]
        assert media is not None
        t.rtcp_at[row] = time.time()
        state = media.rtcp
        if not state.mux and not state.latched:  # symmetric RTCP: answer where it came from
            self.set_remote(row, key_address(key))
            state.latched = True
        now = time.time() if arrival is None else arrival
        for report in reports:
            state.heard(report, int(t.tx_ssrc[row]), now)

    def _srtcp_in(self, data: bytes, key: int) -> bytes | None:
        """A packet on the RTCP port, decrypted if it is for an SRTP call (None: dropped).

        Its call is found as for plain RTCP (the SSRC is in the clear in SRTCP too)."""
        t = self.table
        row = self._rtcp_row(key, int.from_bytes(data[4:8], "big")) if len(data) >= 8 else -1
        if row < 0 or not t.srtp[row]:
            return data
        media = t.media[row]
        plain = media.srtp.unprotect_rtcp(data) if media and media.srtp else None
        if plain is None:
            t.count("srtp_auth", np.array([row]))
        return plain

    def _rtcp_row(self, key: int, ssrc: int) -> int:
        """Which leg an RTCP packet belongs to, by its source and its sender's SSRC (-1:
        nobody's, counted).

        The calls whose reports come from that address (their RTCP address, RTP port
        + 1, or the RTP port itself with rtcp-mux), told apart by SSRC as RTP is: the
        peer's announced or locked SSRC, or the one call there that has not locked yet.
        A report from an address no call uses is matched by SSRC on the same host (a
        phone behind NAT)."""
        t = self.table
        candidates = set(self.rtcp_source.get(key, ()))
        candidates.update(t.rows_at(key - 1), t.rows_at(key))
        if candidates:
            mine = [r for r in candidates if self._hears(r, ssrc)]
            if len(mine) == 1:
                return mine[0]
            open_rows = [r for r in candidates if self._hears(r, None)]
            if not mine and len(candidates) == 1 and open_rows:
                return open_rows[0]
            t.count("ssrc")
            return -1
        host = [r for r in t.active.tolist() if int(t.dest[r]) >> 16 == key >> 16]
        rows = [r for r in host if self._hears(r, ssrc)]
        if len(rows) == 1:
            return rows[0]
        t.count("source")
        return -1

    def _hears(self, row: int, ssrc: int | None) -> bool:
        """Whether the leg takes reports from ``ssrc`` (None: from an SSRC not yet known)."""
        t = self.table
        media = t.media[row]
        if media is None:
            return False
        if media.announced:
            return ssrc in media.announced
        locked = int(t.rx_ssrc[row])
        return locked == NO_SSRC if ssrc is None else locked == ssrc

    # --- out --------------------------------------------------------------------------

    def send_reports(self) -> None:
        """SR (we always send) per leg every ``rtcp_ticks``, spread evenly over the ticks."""
        t = self.table
        rows = t.active
        due = rows[(rows + t.ticks) % self.rtcp_ticks == 0]
        if due.size == 0:
            return
        now = time.time()
        ntp = ntp_now(now)
        for row in due.tolist():
            media = t.media[row]
            if media is None or t.packets_out[row] == 0 or not t.sending[row]:
                continue
            state = media.rtcp
            if state.remote is None:  # with rtcp-mux, the leg's RTP address
                continue
            block = self._report_block(row, state.last_sr, state.dlsr(now))
            sender = (
                ntp,
                int(t.tx_ts[row]),
                int(t.packets_out[row]),
                int(t.payload_out[row]),
            )
            packet = self.srtp_edges.protect_one(
                row, build_report(int(t.tx_ssrc[row]), self.cname, sender, block), rtcp=True
            )
            try:
                if packet is None:
                    raise OSError("SRTCP refused the report")
                (self.rtp_sock if state.mux else self.rtcp_sock).sendto(packet, state.remote)
                state.reports_out += 1
            except OSError:
                media.send_errors += 1

    def _report_block(self, row: int, lsr: int, dlsr: int) -> ReportBlock | None:
        """What we received of the leg's stream since its last report (None: nothing yet)."""
        streams = self.streams
        if streams.ssrc[row] == NO_SSRC:
            return None
        expected = int(streams.expected_of(row))
        received = int(streams.received[row])
        expected_interval = expected - int(streams.expected_prior[row])
        lost_interval = expected_interval - (received - int(streams.received_prior[row]))
        streams.expected_prior[row] = expected
        streams.received_prior[row] = received
        fraction = (
            (lost_interval << 8) // expected_interval
            if expected_interval > 0 and lost_interval > 0
            else 0
        )
        return ReportBlock(
            ssrc=int(streams.ssrc[row]),
            fraction_lost=min(fraction, 255),
            cumulative_lost=expected - received,
            highest_seq=streams.extended_max(row),
            jitter=int(streams.jitter[row] * self.rtp_clock(row) / CODEC_RATE),
            lsr=lsr,
            dlsr=dlsr,
        )
