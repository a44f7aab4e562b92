"""The leg bank: the media of every SIP call, received and sent once per engine tick.

Why a bank: the budget is ≤ 25 µs of CPU per leg per 20 ms frame, everything
included. Per-call threads pacing RTP with sleeps (pyVoIP's way) cost more than
that and drift off the engine's clock, and so does one socket per call with one
``recvmsg``/``sendto`` per packet from Python. Here every call is a row in shared
NumPy columns, and all calls share **one RTP socket** (every SDP gives the same media
port, as session border controllers do); packets are demultiplexed by source
address, which symmetric RTP makes the peer's identity, and SSRC: another BorderLink
(or any peer that sends several calls from one port) announces each call's SSRC in
its SDP (``a=ssrc``), and a call whose peer announced none locks on the SSRC of its
first packet.

Who a packet belongs to, in order: the sorted table of (address, SSRC) keys finds
the call whose peer sends from that address with that SSRC (one search for the whole
batch); a call that has not heard its peer yet matches any SSRC from its address and
locks on the first one. A packet from a call's address with another SSRC is not
mixed in: it is dropped (counted ``ssrc``) unless the call's peer announced no SSRC
and the locked one has been silent for :data:`SSRC_HANDOVER` — RFC 3550 §8.2 makes a
new SSRC from the same address a new source, not the old one's continuation, and
§6.3.5 lets a source go only when it has stopped sending; a phone's voice stream is
50 packets a second, so one second of silence says it stopped (a peer that restarts
its stream, e.g. after a transfer, is heard again after that second).

One tick of the bank, in the order it runs:

1. :mod:`gateway.sip.bank_rx` — before the tick: drain the socket, check and
   demultiplex the packets as columns, jitter-buffer, decode, resample, VOX;
2. the engine takes every leg's frame and gives back what each leg hears
   (:meth:`LegBank.read_frames` / :meth:`LegBank.write_frames`, one NumPy step each);
3. :mod:`gateway.sip.bank_tx` — after the tick: resample, encode, build the RTP
   headers as columns and send every leg's packet with one ``sendmmsg``;
4. :mod:`gateway.sip.bank_rtcp` — reports in (drained with the RTP) and out (after
   the RTP), a few legs per tick;
5. :mod:`gateway.sip.bank_srtp` — for calls with SRTP, at the edges of 1 and 3:
   checked and decrypted right after the receive, protected right before the send;
6. :mod:`gateway.sip.bank_ext` — for legs with an RTP header extension (a link's
   talker): its block handed over and taken out after 5 on receive, put in before 5
   on send;
7. :mod:`gateway.sip.bank_opus` — for legs whose codec is Opus (links between
   BorderLinks): decoded per leg when the jitter bank plays them in 1, encoded per
   leg and sent in their own batch in 3.

The bank owns one :class:`~gateway.sip.legtable.LegTable`: every leg's row (a call
takes one, gives it back at hang-up) with every part's columns, the rows' media, and
the sorted (address, SSRC) index that finds a packet's leg. Each part above is an
object given that table and the parts it hands packets to, built here in that order
(SRTP and extensions, RTCP, Opus, send, receive); none of them knows the bank. This
module adds what only the call manager asks: rows given and taken back, a re-INVITE's
move, whether a row may send yet (not before the caller's ACK), when it last heard its
peer (the media timeout), and the figures per leg and per route.
"""

from __future__ import annotations

import math
import random
import socket
import time
from collections.abc import Callable

import numpy as np

from gateway.monitoring.metrics import ROUTE_COUNTERS, ROUTE_GAUGES
from gateway.ports import PortBank
from gateway.sip.bank_ext import ExtensionEdges
from gateway.sip.bank_opus import OpusEdges
from gateway.sip.bank_rtcp import RTCP_INTERVAL, RtcpReports
from gateway.sip.bank_rx import DECODE, ReceivePath
from gateway.sip.bank_srtp import SrtpEdges
from gateway.sip.bank_tx import ENCODE, SendPath
from gateway.sip.jitter import JitterBank
from gateway.sip.legmedia import LegMedia
from gateway.sip.legtable import CODEC_RATE, MALFORMED_KINDS, NO_PEER, LegTable
from gateway.sip.mmsg import BatchReceiver, BatchSender, address_key
from gateway.sip.resample import BlockResampler
from gateway.sip.rtcp import RtcpState
from gateway.sip.rtp import OPUS, PCMA, PCMU
from gateway.sip.streams import NO_SSRC, StreamBank

__all__ = [
    "DECODE",
    "ENCODE",
    "MALFORMED_KINDS",
    "ROUTE_COUNTERS",
    "ROUTE_GAUGES",
    "LegBank",
    "open_media_sockets",
]

RECEIVE_BUFFER = 4 << 20  # a tick (or two late ones) of 1000 legs' packets, with headroom
_LAWS = {PCMU: 0, PCMA: 1, OPUS: 0}  # codec → row of the G.711 tables (Opus: unused)

# What metrics export per route (never per call: a caller must not make label sets),
# ROUTE_COUNTERS and ROUTE_GAUGES, are listed once, in gateway.monitoring.metrics:
# counters are summed over the route's calls, the ended ones included, so they never go
# back; gauges are the worst (largest) among the calls up now.


def _open_udp(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
            break
        except OSError:  # FORCE needs CAP_NET_ADMIN; the plain one is capped by rmem_max
            continue
    sock.bind((host, port))
    return sock


def open_media_sockets(
    host: str, port_range: tuple[int, int] | None = None
) -> tuple[socket.socket, socket.socket]:
    """The shared RTP socket on an even port and its RTCP socket on the next (RFC 3550 §11)."""
    if port_range is None:
        candidates = [0] * 50
    else:
        low, high = port_range
        candidates = list(range(low + (low & 1), high - 1, 2))
        random.shuffle(candidates)
        candidates = candidates[:200]
    for port in candidates:
        try:
            rtp = _open_udp(host, port)
        except OSError:
            continue
        number = rtp.getsockname()[1]
        if number & 1:
            rtp.close()
            continue
        try:
            return rtp, _open_udp(host, number + 1)
        except OSError:
            rtp.close()
    where = f"{port_range[0]}-{port_range[1]}" if port_range else "any port"
    raise OSError(f"no free RTP/RTCP port pair in {where} on {host}; widen [sip] rtp_ports")


class LegBank(PortBank):
    """Rows of SIP media; the service calls :meth:`receive` before and :meth:`send` after a tick.

    One :class:`~gateway.sip.legtable.LegTable` (``table``) holds every leg's row; the
    parts that work on it are ``receive_path``, ``send_path``, ``rtcp``, ``srtp_edges``,
    ``extensions`` and ``opus_edges``, each given the table and the parts it hands
    packets to. The engine moves every leg's audio in and out with :meth:`read_frames`
    and :meth:`write_frames` (one NumPy step for all legs, no per-leg Python).
    """

    def __init__(
        self,
        rate: int,
        frame_samples: int,
        frame_seconds: float,
        capacity: int = 64,
        host: str = "127.0.0.1",
        port_range: tuple[int, int] | None = None,
        rtcp_interval: float = RTCP_INTERVAL,
        late_by: Callable[[], float] | None = None,
    ) -> None:
        """``late_by``: how late the running tick is on its schedule (the media clock's
        :meth:`~gateway.clock.MediaClock.late_by`); None: the tick is taken as on time."""
        if rate % CODEC_RATE:
            raise ValueError(f"SIP needs an engine rate that is a multiple of 8000 Hz, not {rate}")
        self.rate = rate
        self.frame = frame_samples
        self.frame_seconds = frame_seconds
        self.codec_frame = round(CODEC_RATE * frame_seconds)
        self.factor = rate // CODEC_RATE
        self.jitter = JitterBank(capacity, self.codec_frame, CODEC_RATE)
        self.streams = StreamBank(capacity)
        if self.factor > 1:
            self.up: BlockResampler | None = BlockResampler(self.factor, self.codec_frame, up=True)
            self.down: BlockResampler | None = BlockResampler(
                self.factor, self.codec_frame, up=False
            )
        else:
            self.up = self.down = None
        self.sock, rtcp_sock = open_media_sockets(host, port_range)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.receiver = BatchReceiver(self.sock)
        self.sender = BatchSender(self.sock)
        # The column table depends on the frame sizes, so it is this bank's, not the class's.
        columns = (
            *ReceivePath.columns(frame_samples, self.up),
            *SendPath.columns(frame_samples, self.down),
            *ExtensionEdges.columns(),
            *OpusEdges.columns(),
        )
        self.table = table = LegTable(columns, capacity)  # and the columns every part shares
        self.srtp_edges = SrtpEdges(table)
        self.extensions = ExtensionEdges(table)
        ticks = max(1, round(rtcp_interval / frame_seconds))
        self.rtcp = RtcpReports(
            table, self.streams, self.srtp_edges, self.sock, rtcp_sock, ticks, f"borderlink@{host}"
        )
        self.opus_edges = OpusEdges(
            table,
            self.jitter,
            self.streams,
            self.sender,
            self.srtp_edges,
            self.extensions,
            rate,
            frame_samples,
            self.codec_frame,
        )
        self.send_path = SendPath(
            table,
            self.sock,
            self.sender,
            self.down,
            self.srtp_edges,
            self.extensions,
            self.opus_edges,
            self.rtcp,
            self.codec_frame,
        )
        self.receive_path = ReceivePath(
            table,
            self.jitter,
            self.streams,
            self.receiver,
            self.up,
            self.srtp_edges,
            self.extensions,
            self.opus_edges,
            self.rtcp,
            late_by or (lambda: 0.0),
        )
        # Per (route, talkgroup): what ended calls had counted (rows of ROUTE_COUNTERS).
        self.groups: list[tuple[str, str]] = []
        self._group_ids: dict[tuple[str, str], int] = {}
        self.ended = np.zeros((0, len(ROUTE_COUNTERS)), np.float64)
        self.cpu_seconds = {"receive": 0.0, "send": 0.0}  # media CPU (this thread), for benches
        self._members: tuple[list, np.ndarray] | None = None  # the engine's port list → rows
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` legs in every column, the helpers' included."""
        self.table.grow(capacity)
        self.jitter.grow(capacity)
        self.streams.grow(capacity)
        self.send_path.view()

    # --- rows -------------------------------------------------------------------------

    def add(self, media: LegMedia) -> int:
        """Give a leg a row; its packets are recognised by the SDP address until it latches."""
        t = self.table
        if t.free:
            row = t.free.pop()
            t.media[row] = media
        else:
            row = len(t.media)
            t.media.append(media)
            if row >= t.capacity:
                self.grow(t.capacity * 2)
        t.reset(row)
        self.jitter.reset(row)
        self.streams.reset(row)
        t.group[row] = self._group_id(media.group)
        self._set_codec(row, media)
        if media.srtp is not None:
            t.srtp[row] = True
            t.srtp_rx[row], t.srtp_tx[row] = media.srtp.rx_address, media.srtp.tx_address
        self.send_path.start(row)
        if media.ssrc is not None:
            t.tx_ssrc[row] = media.ssrc
        media.ssrc = int(t.tx_ssrc[row])
        t.rtp_at[row] = t.rtcp_at[row] = time.time()  # the media timeout starts now
        if media.offered is None:
            media.offered = media.remote
        rtcp_remote = media.rtcp.remote
        if media.rtcp.mux:  # RFC 5761: reports travel with the RTP
            rtcp_remote = media.remote
        elif rtcp_remote is None and media.remote is not None:  # RFC 3550: RTP port + 1
            rtcp_remote = (media.remote[0], media.remote[1] + 1)
        media.rtcp.remote = None
        self.rtcp.set_remote(row, rtcp_remote)
        if media.remote is not None:
            t.dest[row] = address_key(*media.remote)
        self._rows_changed()
        return row

    def new_ssrc(self) -> int:
        """An SSRC for a call about to be described in SDP, unlike every other call's."""
        t = self.table
        used = set(t.tx_ssrc[t.active].tolist())
        while True:
            ssrc = random.getrandbits(32)
            if ssrc not in used:
                return ssrc

    def start_sending(self, row: int) -> None:
        """The call is confirmed (ACK): its RTP and RTCP may go out."""
        self.table.sending[row] = True

    def move(
        self,
        row: int,
        media: LegMedia,
        remote: tuple[str, int],
        rtcp: RtcpState,
        payload_type: int,
        dtmf_type: int | None,
        announced: tuple[int, ...],
        codec: int | None = None,
    ) -> None:
        """A re-INVITE moved the call's media: all of it changes in this one step.

        The stream starts again (latching, SSRC lock, statistics, jitter buffer); our
        own SSRC, sequence and timestamp go on (RFC 3264 §8: same stream, new place)."""
        t = self.table
        self.rtcp.set_remote(row, None)
        media.payload_type = payload_type
        media.codec = codec
        media.dtmf_type = dtmf_type
        media.remote = media.offered = remote
        media.announced = announced
        media.rtcp = rtcp
        self._set_codec(row, media)
        t.dest[row] = address_key(*remote)
        t.latched[row] = False
        t.rx_ssrc[row] = NO_SSRC
        t.rtp_at[row] = t.rtcp_at[row] = time.time()
        self.jitter.reset(row)
        self.jitter.whole[row] = t.opus[row]
        self.streams.reset(row)
        rtcp_remote = rtcp.remote
        if rtcp.mux:
            rtcp_remote = remote
        elif rtcp_remote is None:
            rtcp_remote = (remote[0], remote[1] + 1)
        rtcp.remote = None
        self.rtcp.set_remote(row, rtcp_remote)
        self._rows_changed()

    def _set_codec(self, row: int, media: LegMedia) -> None:
        """The leg's codec: G.711 (a row of the tables) or Opus (its own encoder/decoder),
        sent and expected under the payload type the call agreed."""
        t = self.table
        codec = media.payload_type if media.codec is None else media.codec
        t.payload_type[row] = media.payload_type
        t.law[row] = _LAWS[codec]
        if codec == OPUS or t.opus[row]:  # a new encoder/decoder, or none
            self.opus_edges.start(row, codec == OPUS)

    def _rows_changed(self) -> None:
        """A leg came, went, moved or changed codec: the table's index."""
        self.table.update()

    def silent_rows(self, timeout: float) -> np.ndarray:
        """Rows whose peer has sent neither RTP nor RTCP for ``timeout`` seconds."""
        t = self.table
        rows = t.active
        last = np.maximum(t.rtp_at[rows], t.rtcp_at[rows])
        return rows[time.time() - last >= timeout]

    def rows_using(self, address: tuple[str, int]) -> list[int]:
        """Calls whose peer sends from, or whose SDP named, this RTP address."""
        t = self.table
        key = address_key(*address)
        return [
            row
            for row in t.active.tolist()
            if t.dest[row] == key
            or ((media := t.media[row]) is not None and media.offered == address)
        ]

    def remove(self, row: int) -> None:
        t = self.table
        media = t.media[row]
        if media is None:
            return
        rows = np.array([row])
        self.ended[t.group[row]] += self._row_counters(rows)[0]
        self.rtcp.set_remote(row, None)
        t.dest[row] = NO_PEER
        t.srtp[row] = False
        t.srtp_rx[row] = t.srtp_tx[row] = 0
        if t.opus[row]:
            self.opus_edges.start(row, False)
        t.sending[row] = False
        t.media[row] = None
        t.free.append(row)
        self._rows_changed()

    def close(self) -> None:
        for row, media in enumerate(self.table.media):
            if media is not None:
                self.remove(row)
        self.sock.close()
        self.rtcp.rtcp_sock.close()

    # --- the tick ---------------------------------------------------------------------

    def receive(self) -> None:
        """Before the tick: every leg's frame and talking flag (:mod:`gateway.sip.bank_rx`)."""
        self._timed("receive", self.receive_path.receive)

    def send(self) -> None:
        """After the tick: every leg's packet out, reports due (:mod:`gateway.sip.bank_tx`)."""
        self._timed("send", self.send_path.send)

    def _timed(self, step: str, work: Callable[[], None]) -> None:
        """Run one step, adding the media thread's CPU time to ``cpu_seconds`` (benches)."""
        started = time.thread_time()
        try:
            work()
        finally:
            self.cpu_seconds[step] += time.thread_time() - started

    # --- the engine's side (during the tick) ------------------------------------------

    def _rows_of(self, ports: list) -> np.ndarray:
        """Bank rows of the engine's port list (the list lives as long as the layout)."""
        cached = self._members
        if cached is None or cached[0] is not ports:
            cached = (ports, np.array([port.row for port in ports], np.int64))
            self._members = cached
        return cached[1]

    def read_frames(
        self, ports: list, frames: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every talking leg's frame into the engine's matrix; (has_frame, talking)."""
        t = self.table
        legs = self._rows_of(ports)
        talking = t.talking[legs]
        if talking.all():
            frames[rows] = t.rx[legs]
        elif talking.any():
            frames[rows[talking]] = t.rx[legs[talking]]
        return talking, talking.copy()

    def write_frames(
        self, ports: list, out: np.ndarray, rows: np.ndarray, audible: np.ndarray
    ) -> None:
        """What each leg hears, copied for :meth:`send` after the tick (silence if not audible)."""
        t = self.table
        legs = self._rows_of(ports)
        if audible.all():
            t.tx[legs] = out[rows]
        elif audible.any():
            t.tx[legs[audible]] = out[rows[audible]]
        t.tx_has[legs] = audible

    # --- per route (metrics) ------------------------------------------------------------

    def _group_id(self, group: tuple[str, str]) -> int:
        """The row of ``ended`` that a (route, talkgroup) counts into (made on first use)."""
        found = self._group_ids.get(group)
        if found is None:
            found = self._group_ids[group] = len(self.groups)
            self.groups.append(group)
            self.ended = np.vstack([self.ended, np.zeros((1, len(ROUTE_COUNTERS)))])
        return found

    def _row_counters(self, rows: np.ndarray) -> np.ndarray:
        """ROUTE_COUNTERS of some legs, one row each. The RTCP figures and the malformed
        count live in each leg's LegMedia (they change a few times a minute)."""
        t = self.table
        streams, jitter = self.streams, self.jitter
        media = [t.media[r] for r in rows.tolist()]
        columns = [
            t.packets_in[rows],
            t.packets_out[rows],
            t.bytes_in[rows],
            t.bytes_out[rows],
            streams.lost_of(rows) + streams.lost_before[rows],
            jitter.packets_late[rows],
            [m.malformed for m in media],
            jitter.concealed[rows] * self.factor,
            [self.opus_edges.fec_recovered(r) for r in rows.tolist()],
            [m.rtcp.reports_in for m in media],
            [m.rtcp.reports_out for m in media],
            [max(0, m.rtcp.remote_lost) for m in media],
        ]
        return np.array(columns, np.float64).reshape(len(columns), len(rows)).T

    def _row_gauges(self, rows: np.ndarray) -> np.ndarray:
        """ROUTE_GAUGES of some legs (NaN: not known yet, e.g. no round trip measured)."""
        media = [self.table.media[r] for r in rows.tolist()]
        columns = [
            self.streams.jitter[rows] / CODEC_RATE,
            np.maximum(0.0, self.jitter.delay[rows]) / CODEC_RATE,
            np.array([m.rtcp.remote_jitter for m in media], np.float64) / self.rtcp.rtp_clock(rows),
            [math.nan if m.rtcp.rtt is None else m.rtcp.rtt for m in media],
        ]
        return np.array(columns, np.float64).reshape(len(columns), len(rows)).T

    def route_stats(self) -> dict[tuple[str, str], dict[str, float]]:
        """Per (route, talkgroup): ROUTE_COUNTERS summed over its calls, ended ones included,
        and ROUTE_GAUGES as the largest among its calls up now (absent with no call up).

        Every (route, talkgroup) that ever had a call is here, so counters never vanish."""
        t = self.table
        rows = t.active
        ids = t.group[rows]
        totals = self.ended.copy()
        worst = np.full((len(self.groups), len(ROUTE_GAUGES)), -np.inf)
        if rows.size:
            np.add.at(totals, ids, self._row_counters(rows))
            np.fmax.at(worst, ids, self._row_gauges(rows))
        report: dict[tuple[str, str], dict[str, float]] = {}
        for i, group in enumerate(self.groups):
            figures = dict(zip(ROUTE_COUNTERS, totals[i].tolist(), strict=True))
            for key, value in zip(ROUTE_GAUGES, worst[i].tolist(), strict=True):
                if math.isfinite(value):
                    figures[key] = value
            report[group] = figures
        return report

    # --- per leg ---------------------------------------------------------------------

    def stats(self, row: int) -> dict[str, float]:
        t = self.table
        media = t.media[row]
        if media is None:
            return {}
        streams = self.streams
        return {
            "packets_in": int(t.packets_in[row]),
            "packets_out": int(t.packets_out[row]),
            "bytes_in": int(t.bytes_in[row]),
            "bytes_out": int(t.bytes_out[row]),
            "packets_lost": int(streams.lost_of(row) + streams.lost_before[row]),
            "packets_late": int(self.jitter.packets_late[row]),
            "packets_malformed": media.malformed,
            "jitter_seconds": float(streams.jitter[row]) / CODEC_RATE,
            "concealed_samples": int(self.jitter.concealed[row]) * self.factor,
            "fec_recovered": self.opus_edges.fec_recovered(row),
            "jitter_buffer_seconds": max(0.0, float(self.jitter.delay[row]) / CODEC_RATE),
            "rtcp_reports_in": media.rtcp.reports_in,
            "rtcp_reports_out": media.rtcp.reports_out,
            # What the far end reports of our stream, and the round trip (once it echoed an SR).
            "remote_packets_lost": media.rtcp.remote_lost,
            "remote_jitter_seconds": media.rtcp.remote_jitter / int(self.rtcp.rtp_clock(row)),
            **({"rtt_seconds": media.rtcp.rtt} if media.rtcp.rtt is not None else {}),
        }
