"""The leg bank: the media of every SIP call, received and sent once per engine tick.

Why a bank: the budget is ≤ 25 µs of CPU per leg per 20 ms frame, everything
included. Per-call threads pacing RTP with sleeps (pyVoIP's way) cost more than
that and drift off the engine's clock, and so does one socket per call with one
``recvmsg``/``sendto`` per packet from Python. Here every call is a row in shared
arrays, and all calls share **one RTP socket** (every SDP gives the same media
port, as session border controllers do); packets are demultiplexed by source
address, which symmetric RTP makes the peer's identity:

* before the tick, ``recvmmsg`` drains every queued packet of every leg in one
  system call per 1024 packets, each with the kernel's arrival time
  (``SO_TIMESTAMPNS``), so draining once per tick does not blur the jitter
  measurement; the headers of the whole batch are read as NumPy columns,
  checked, counted and put in the jitter bank row by row-distinct rounds;
* then one gather + one table lookup decodes G.711 for all legs, one matrix
  product resamples them to the engine rate, and VOX is one vector compare;
* after the tick, the engine's frames for all legs are resampled and encoded in
  one go, the RTP headers built as columns, and ``sendmmsg`` sends every leg's
  packet in one call (to the address the phone sends from, once it has sent).

Per-packet Python runs only for the rare packets: RFC 4733 events, comfort
noise, RTCP multiplexed on the RTP port, RTP with header extensions/CSRCs/
padding, and the first packet from a phone behind NAT (latching).
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gateway.codecs.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from gateway.ports import PortBank
from gateway.sip.jitter import JitterBank, dense
from gateway.sip.mmsg import (
    SO_TIMESTAMPNS,
    BatchReceiver,
    BatchSender,
    address_key,
    key_address,
)
from gateway.sip.resample import BlockResampler
from gateway.sip.rtcp import (
    ReportBlock,
    RtcpState,
    build_report,
    is_rtcp,
    ntp_now,
    parse_compound,
)
from gateway.sip.rtp import (
    PCMA,
    PCMU,
    build_event,
    build_header,
    parse_event,
    parse_rtp,
)
from gateway.sip.streams import StreamBank

log = logging.getLogger(__name__)

CODEC_RATE = 8000
COMFORT_NOISE = 13  # RFC 3389: accepted and ignored, not counted as malformed
DTMF_SEND_SECONDS = 0.1
HEADER_SIZE = 12
MAX_PAYLOAD = 1200  # 150 ms of G.711, our a=maxptime
MAX_PACKET = 1500
SILENCE_DB = -120.0
RECEIVE_BUFFER = 4 << 20  # a tick (or two late ones) of 1000 legs' packets, with headroom
NO_PEER = -1

# Why a packet was dropped (bank-wide counters, and per leg when the sender is known).
MALFORMED_KINDS = (
    "truncated",  # shorter than an RTP header
    "huge",  # longer than any voice packet we agreed to
    "version",  # not RTP version 2 (garbage usually lands here)
    "layout",  # CSRC list, extension or padding pointing past the end; no payload
    "payload_type",  # a payload type the call did not agree on
    "event",  # a telephone-event that is not a DTMF key
    "source",  # from an address that is no call's peer (stray or spoofed)
    "rtcp",  # RTCP that does not parse (lengths past the end, not SR/RR first)
)
_STAMP_SPACE = socket.CMSG_SPACE(16)
RTCP_INTERVAL = 5.0  # seconds between one leg's reports (RFC 3550 §6.2: 5 s minimum)

_LAWS = {PCMU: 0, PCMA: 1}


def _tables() -> tuple[np.ndarray, np.ndarray]:
    codes = np.arange(256, dtype=np.uint8)
    decode = np.stack([ulaw_decode(codes), alaw_decode(codes)]).astype(np.float32) / 32768.0
    pcm = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16)
    encode = np.stack([ulaw_encode(pcm), alaw_encode(pcm)])
    return decode, encode


DECODE, ENCODE = _tables()


@dataclass
class LegMedia:
    """One leg's RTP state that is not a per-tick array: addresses, DTMF, rare counters."""

    payload_type: int
    dtmf_type: int | None
    remote: tuple[str, int] | None  # where the SDP says the peer's RTP is
    on_dtmf: Callable[[str, bool], None] | None = None
    rtcp: RtcpState = field(default_factory=lambda: RtcpState(None))
    malformed: int = 0
    send_errors: int = 0
    event_ts: int | None = None  # RTP timestamp of the DTMF event being received
    event_ended: bool = True
    dtmf_out: list[str] = field(default_factory=list)
    dtmf_sending: tuple[str, int, int] | None = None  # digit, start ts, samples sent


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

    The engine moves every leg's audio in and out with :meth:`read_frames` and
    :meth:`write_frames` (one NumPy step for all legs, no per-leg Python).
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
    ) -> None:
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
        self.sock, self.rtcp_sock = open_media_sockets(host, port_range)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.receiver = BatchReceiver(self.sock)
        self.sender = BatchSender(self.sock)
        self.rtcp_sock.setblocking(False)
        self.rtcp_sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.rtcp_ticks = max(1, round(rtcp_interval / frame_seconds))
        self.cname = f"borderlink@{host}"
        self.media: list[LegMedia | None] = []
        self.free: list[int] = []
        self.by_source: dict[int, int] = {}  # peer address key → row
        self.rtcp_source: dict[int, int] = {}  # peer RTCP address key → row
        self.waiting: dict[int, set[int]] = {}  # host → rows whose peer has not sent yet
        self._keys = np.zeros(0, np.int64)  # the same, sorted, for vectorised lookup
        self._key_rows = np.zeros(0, np.int64)
        self.malformed = dict.fromkeys(MALFORMED_KINDS, 0)
        self.cpu_seconds = {"receive": 0.0, "send": 0.0}  # media CPU (this thread), for benches
        self.epoch_seconds = int(time.time())  # whole seconds: arrivals keep ns precision
        self._epoch_ns = self.epoch_seconds * 1_000_000_000
        self._t0: float | None = None
        self._k = 0
        self._members: tuple[list, np.ndarray] | None = None  # the engine's port list → rows
        self._allocate(capacity)
        self.active = np.zeros(0, np.int64)

    def _allocate(self, capacity: int) -> None:
        old = self.__dict__.copy() if hasattr(self, "rx") else None
        self.capacity = capacity
        self.jitter.grow(capacity)
        self.streams.grow(capacity)
        hist_up = self.up.history_length if self.up else 0
        hist_down = self.down.history_length if self.down else 0
        self.rx = np.zeros((capacity, self.frame), np.float32)
        # What each leg hears, just after its resampling history (one buffer: no joining copy).
        self.tx_ext = np.zeros((capacity, hist_down + self.frame), np.float32)
        self.tx = self.tx_ext[:, hist_down:]
        self.tx_has = np.zeros(capacity, bool)
        self.up_hist = np.zeros((capacity, hist_up), np.float32)
        self.law = np.zeros(capacity, np.int64)
        self.talking = np.zeros(capacity, bool)
        self.vox = np.ones(capacity, bool)  # VOX keying (False: DTMF PTT)
        self.ptt = np.zeros(capacity, bool)  # DTMF PTT pressed
        self.muted = np.zeros(capacity, bool)  # PIN not yet entered
        self.vox_threshold = np.full(capacity, -40.0, np.float32)
        self.vox_hang = np.zeros(capacity, np.int64)
        self.vox_hold = np.zeros(capacity, np.int64)
        self.level_db = np.full(capacity, SILENCE_DB, np.float32)
        # What we receive, per row (the rest is in `streams` and `jitter`).
        self.rx_pt = np.full(capacity, -1, np.int64)
        self.latched = np.zeros(capacity, bool)  # the peer has sent: `dest` is where it sends from
        self.packets_in = np.zeros(capacity, np.int64)
        self.bytes_in = np.zeros(capacity, np.int64)
        # What we send, per row: RTP header fields and counters, updated in batches.
        self.dest = np.full(capacity, NO_PEER, np.int64)  # address key, or NO_PEER
        self.busy = np.zeros(capacity, bool)  # sending RFC 4733 events instead of audio
        self.tx_seq = np.zeros(capacity, np.int64)
        self.tx_ts = np.zeros(capacity, np.int64)
        self.tx_ssrc = np.zeros(capacity, np.int64)
        self.tx_pt = np.zeros(capacity, np.uint8)
        self.tx_first = np.zeros(capacity, bool)
        self.packets_out = np.zeros(capacity, np.int64)
        self.bytes_out = np.zeros(capacity, np.int64)
        self.payload_out = np.zeros(capacity, np.int64)  # octets of payload (RTCP SR)
        if old is not None:
            n = old["capacity"]
            for name, value in old.items():
                if isinstance(value, np.ndarray) and value.shape[:1] == (n,):
                    getattr(self, name)[:n] = value

    # --- rows -------------------------------------------------------------------------

    def add(self, media: LegMedia) -> int:
        """Give a leg a row; its packets are recognised by the SDP address until it latches."""
        if self.free:
            row = self.free.pop()
            self.media[row] = media
        else:
            row = len(self.media)
            self.media.append(media)
            if row >= self.capacity:
                self._allocate(self.capacity * 2)
        self.jitter.reset(row)
        self.streams.reset(row)
        for name in ("rx", "tx_ext", "up_hist"):
            getattr(self, name)[row] = 0.0
        self.tx_has[row] = False
        self.talking[row] = self.ptt[row] = self.muted[row] = False
        self.vox_hold[row] = 0
        self.level_db[row] = SILENCE_DB
        self.law[row] = _LAWS[media.payload_type]
        self.rx_pt[row] = media.payload_type
        self.packets_in[row] = self.bytes_in[row] = 0
        self.tx_seq[row] = random.getrandbits(16)
        self.tx_ts[row] = random.getrandbits(32)
        self.tx_ssrc[row] = random.getrandbits(32)
        self.tx_pt[row] = media.payload_type
        self.tx_first[row] = True
        self.busy[row] = False
        self.packets_out[row] = self.bytes_out[row] = self.payload_out[row] = 0
        self.dest[row] = NO_PEER
        self.latched[row] = False
        rtcp_remote = media.rtcp.remote
        if media.rtcp.mux:  # RFC 5761: reports travel with the RTP
            rtcp_remote = media.remote
        elif rtcp_remote is None and media.remote is not None:  # RFC 3550: RTP port + 1
            rtcp_remote = (media.remote[0], media.remote[1] + 1)
        media.rtcp.remote = None
        self.set_rtcp_remote(row, rtcp_remote)
        if media.remote is not None:
            key = address_key(*media.remote)
            self.dest[row] = key
            self.by_source[key] = row
            self.waiting.setdefault(key >> 16, set()).add(row)
        self._update_tables()
        return row

    def _not_waiting(self, row: int) -> None:
        host = int(self.dest[row]) >> 16
        rows = self.waiting.get(host)
        if rows is not None:
            rows.discard(row)
            if not rows:
                del self.waiting[host]

    def remove(self, row: int) -> None:
        media = self.media[row]
        if media is None:
            return
        for key in [k for k, r in self.by_source.items() if r == row]:
            del self.by_source[key]
        self.set_rtcp_remote(row, None)
        self._not_waiting(row)
        self.dest[row] = NO_PEER
        self.media[row] = None
        self.free.append(row)
        self._update_tables()

    def _update_tables(self) -> None:
        self.active = np.array([i for i, m in enumerate(self.media) if m is not None], np.int64)
        keys = np.array(sorted(self.by_source), np.int64)
        self._keys = keys
        self._key_rows = np.array([self.by_source[k] for k in keys.tolist()], np.int64)

    def _latch(self, row: int, key: int) -> None:
        """Symmetric RTP (RFC 4961): answer where the phone really sends from."""
        media = self.media[row]
        assert media is not None
        for old in [k for k, r in self.by_source.items() if r == row]:
            del self.by_source[old]
        self._not_waiting(row)
        self.by_source[key] = row
        self.dest[row] = key
        self.latched[row] = True
        media.remote = key_address(key)
        if media.rtcp.mux:
            self.set_rtcp_remote(row, media.remote)
        self._update_tables()

    def close(self) -> None:
        for row, media in enumerate(self.media):
            if media is not None:
                self.remove(row)
        self.sock.close()
        self.rtcp_sock.close()

    # --- clock --------------------------------------------------------------------

    def _tick_time(self) -> float:
        """This tick's ideal time, in codec samples since the bank's epoch.

        Ticks run on an absolute schedule; using the schedule (not the moment
        the loop woke up) keeps timer lateness out of the playout point.
        """
        now = time.time()
        period = self.frame_seconds
        if self._t0 is None or abs(now - (self._t0 + self._k * period)) > 3 * period:
            self._t0 = now - self._k * period
        ideal = self._t0 + self._k * period
        self._k += 1
        return (ideal - self.epoch_seconds) * CODEC_RATE

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
        legs = self._rows_of(ports)
        talking = self.talking[legs]
        if talking.all():
            frames[rows] = self.rx[legs]
        elif talking.any():
            frames[rows[talking]] = self.rx[legs[talking]]
        return talking, talking.copy()

    def write_frames(
        self, ports: list, out: np.ndarray, rows: np.ndarray, audible: np.ndarray
    ) -> None:
        """What each leg hears, copied for :meth:`send` after the tick (silence if not audible)."""
        legs = self._rows_of(ports)
        if audible.all():
            self.tx[legs] = out[rows]
        elif audible.any():
            self.tx[legs[audible]] = out[rows[audible]]
        self.tx_has[legs] = audible

    # --- receive (before the tick) --------------------------------------------------

    def receive(self) -> None:
        started = time.thread_time()
        try:
            self._receive()
        finally:
            self.cpu_seconds["receive"] += time.thread_time() - started

    def _receive(self) -> None:
        now = self._tick_time()
        self.drain()
        self.drain_rtcp()
        rows = self.active
        if rows.size == 0:
            return
        sel = dense(rows)
        pcm = self.jitter.playout(rows, now, self.talking[sel], DECODE, self.law)
        rms = np.sqrt(np.einsum("ij,ij->i", pcm, pcm) / pcm.shape[1])
        level = 20.0 * np.log10(np.maximum(rms, 1e-6))
        self.level_db[sel] = level
        voice = level > self.vox_threshold[sel]
        hold = np.where(voice, self.vox_hang[sel] + 1, np.maximum(self.vox_hold[sel] - 1, 0))
        self.vox_hold[sel] = hold
        talking = np.where(self.vox[sel], hold > 0, self.ptt[sel]) & ~self.muted[sel]
        self.talking[sel] = talking
        if self.up is not None:
            out, self.up_hist[sel] = self.up.process(pcm, self.up_hist[sel])
            self.rx[sel] = out
        else:
            self.rx[sel] = pcm

    def drain(self) -> None:
        """Read the queued datagrams on the shared socket (never waits).

        At most a few ticks' worth for the calls up: a flood waits in (and overflows)
        the socket buffer instead of stretching this tick without end."""
        receiver = self.receiver
        for _ in range(2 + 4 * len(self.active) // receiver.slots):
            n = receiver.receive()
            if n:
                self._batch(n)
            if n < receiver.slots:
                return

    def _count(self, kind: str, rows: np.ndarray | None = None, amount: int = 1) -> None:
        self.malformed[kind] += amount
        if rows is not None:
            for row in rows.tolist():
                media = self.media[row]
                if media is not None:
                    media.malformed += 1

    def _batch(self, n: int) -> None:
        """Check, demultiplex and account ``n`` received datagrams, all as columns."""
        length, truncated, source, arrival_ns = self.receiver.columns(n)
        data = self.receiver.data[:n]
        arrival = (arrival_ns - self._epoch_ns) * (CODEC_RATE * 1e-9)
        # One gather of the headers: the slots are 2 KiB apart, so every pass over a
        # column of `data` itself would miss the cache once per packet.
        head = np.ascontiguousarray(data[:, :HEADER_SIZE])
        b0 = head[:, 0]
        b1 = head[:, 1]
        huge = truncated | (length > MAX_PACKET)
        short = (length < HEADER_SIZE) & ~huge
        wrong_version = ((b0 >> 6) != 2) & ~huge & ~short
        good = ~(huge | short | wrong_version)
        # Which leg: the row whose peer address is the source (or -1).
        rows = np.full(n, -1, np.int64)
        if self._keys.size:
            at = np.searchsorted(self._keys, source)
            at_ok = at < self._keys.size
            found = at_ok.copy()
            found[at_ok] = self._keys[at[at_ok]] == source[at_ok]
            rows[found] = self._key_rows[at[found]]
        known = rows >= 0
        for kind, mask in (("huge", huge), ("truncated", short), ("version", wrong_version)):
            if mask.any():
                self._count(kind, rows[mask & known], int(mask.sum()))
        # The common packet: plain header, the agreed codec, from a known peer.
        pt = (b1 & 0x7F).astype(np.int64)
        fast = (
            good
            & known
            & (b0 == 0x80)
            & (length > HEADER_SIZE)
            & (length <= HEADER_SIZE + MAX_PAYLOAD)
            & (pt == self.rx_pt[rows])
        )
        if fast.any():
            self._audio(np.flatnonzero(fast), rows, length, arrival, data, head)
        rest = good & ~fast
        stray = rest & ~known
        if stray.any():  # from nobody's address: only a host with a call waiting may latch
            waiting = np.array(list(self.waiting), np.int64)
            hopeless = stray & ~np.isin(source >> 16, waiting)
            hopeless &= ~((b1 >= 192) & (b1 <= 223))  # RTCP on the RTP port: checked below
            if hopeless.any():
                self._count("source", None, int(hopeless.sum()))
                rest &= ~hopeless
        for i in np.flatnonzero(rest).tolist():
            self._packet(int(rows[i]), int(source[i]), bytes(data[i, : length[i]]), arrival[i])

    def _audio(
        self,
        idx: np.ndarray,
        rows_of: np.ndarray,
        length: np.ndarray,
        arrival: np.ndarray,
        data: np.ndarray,
        head: np.ndarray,
    ) -> None:
        """Audio packets ``idx`` of a batch into their rows, in rounds of distinct rows."""
        rows = rows_of[idx]
        new = rows[~self.latched[rows]]
        if new.size:  # from the SDP address: symmetric RTP already holds
            for row in np.unique(new).tolist():
                self._not_waiting(row)
            self.latched[new] = True
        np.add.at(self.packets_in, rows, 1)
        np.add.at(self.bytes_in, rows, length[idx])
        header = head[idx].astype(np.int64)
        seq = (header[:, 2] << 8) | header[:, 3]
        ts = (header[:, 4] << 24) | (header[:, 5] << 16) | (header[:, 6] << 8) | header[:, 7]
        ssrc = (header[:, 8] << 24) | (header[:, 9] << 16) | (header[:, 10] << 8) | header[:, 11]
        marker = (header[:, 1] & 0x80) != 0
        order = np.argsort(rows, kind="stable")  # per row, arrival order is kept
        sorted_rows = rows[order]
        first = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
        rank = np.empty(len(idx), np.int64)
        rank[order] = np.arange(len(idx)) - np.repeat(first, np.diff(np.r_[first, len(idx)]))
        size = length[idx] - HEADER_SIZE
        rounds = int(rank.max()) + 1
        for k in range(rounds):
            pick = np.flatnonzero(rank == k) if rounds > 1 else np.arange(len(idx))
            self._put(
                rows[pick], ssrc[pick], seq[pick], ts[pick], arrival[idx[pick]],
                marker[pick], data, idx[pick], size[pick],
            )  # fmt: skip

    def _put(
        self,
        rows: np.ndarray,
        ssrc: np.ndarray,
        seq: np.ndarray,
        ts: np.ndarray,
        arrival: np.ndarray,
        marker: np.ndarray,
        data: np.ndarray,
        idx: np.ndarray,
        size: np.ndarray,
    ) -> None:
        """One packet for each of ``rows`` (distinct): receive stats, then the jitter bank."""
        changed = self.streams.update(rows, ssrc, seq, ts, arrival)
        if changed.size:
            self.jitter.resync(changed)
        n = int(size[0])
        if (size == n).all():
            self.jitter.put_batch(
                rows, ts, data[idx, HEADER_SIZE : HEADER_SIZE + n], arrival, marker
            )
            return
        for s in np.unique(size).tolist():  # mixed packet times in one tick: rare
            m = size == s
            self.jitter.put_batch(
                rows[m], ts[m], data[idx[m], HEADER_SIZE : HEADER_SIZE + s], arrival[m], marker[m]
            )

    def _packet(self, row: int, key: int, data: bytes, arrival: float) -> None:
        """A packet off the common path: checked in full by the one-packet parser."""
        if is_rtcp(data[1]):  # RTCP multiplexed on the RTP port (RFC 5761)
            self._rtcp(data, key, row, self.epoch_seconds + arrival / CODEC_RATE)
            return
        packet = parse_rtp(data)
        if packet is None:
            self._count("layout", np.array([row]) if row >= 0 else None)
            return
        if row < 0:
            row = self._match_unlatched(key)
            if row < 0:
                self._count("source")
                return
        media = self.media[row]
        assert media is not None
        pt = packet.payload_type
        if pt == media.payload_type:
            if len(packet.payload) > MAX_PAYLOAD:
                self._count("huge", np.array([row]))
                return
            if key != self.dest[row]:
                self._latch(row, key)
            elif not self.latched[row]:
                self._not_waiting(row)
            self.latched[row] = True
            self.packets_in[row] += 1
            self.bytes_in[row] += len(data)
            self._put(
                np.array([row]), np.array([packet.ssrc]), np.array([packet.sequence]),
                np.array([packet.timestamp]), np.array([arrival]), np.array([packet.marker]),
                np.frombuffer(bytes(12) + bytes(packet.payload), np.uint8).reshape(1, -1),
                np.array([0]), np.array([len(packet.payload)]),
            )  # fmt: skip
        elif pt == media.dtmf_type:
            event = parse_event(packet.payload)
            if event is None:
                self._count("event", np.array([row]))
                return
            self.packets_in[row] += 1
            self.bytes_in[row] += len(data)
            self._dtmf(media, packet.timestamp, event.digit, event.end)
        elif pt == COMFORT_NOISE:
            self.packets_in[row] += 1
            self.bytes_in[row] += len(data)
        else:
            self._count("payload_type", np.array([row]))

    def _match_unlatched(self, key: int) -> int:
        """A packet from an address no leg knows: the one unlatched leg expecting its host.

        A phone behind NAT sends from another port than its SDP says; if exactly one
        call from that host has not latched yet, the packet is that call's.
        """
        waiting = self.waiting.get(key >> 16)
        if not waiting or len(waiting) != 1:
            return -1
        (row,) = waiting
        self._latch(row, key)
        return row

    @staticmethod
    def _dtmf(media: LegMedia, timestamp: int, digit: str, end: bool) -> None:
        """RFC 4733: one key press is one timestamp, repeated; report press and release once."""
        if timestamp != media.event_ts:
            if media.event_ts is not None and not media.event_ended and media.on_dtmf:
                media.on_dtmf(digit, False)  # the previous end packets were lost
            media.event_ts = timestamp
            media.event_ended = False
            if media.on_dtmf:
                media.on_dtmf(digit, True)
        if end and not media.event_ended:
            media.event_ended = True
            if media.on_dtmf:
                media.on_dtmf(digit, False)

    # --- RTCP -------------------------------------------------------------------------

    def drain_rtcp(self) -> None:
        """Reports on the RTCP port: a few per second per hundred legs, read one by one,
        each with its kernel arrival time (the round trip must not include our tick).

        At most a few per call per tick: a flood on this port waits in (and overflows)
        the socket buffer instead of stretching the tick."""
        for _ in range(64 + 2 * len(self.active)):
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
            self._rtcp(data, address_key(*source[:2]), None, arrival)

    def set_rtcp_remote(self, row: int, address: tuple[str, int] | None) -> None:
        """Where the leg's reports go (and whose reports are the leg's)."""
        media = self.media[row]
        assert media is not None
        old = media.rtcp.remote
        if old is not None:
            self.rtcp_source.pop(address_key(*old), None)
        media.rtcp.remote = address
        if address is not None:
            self.rtcp_source[address_key(*address)] = row

    def _rtcp(self, data: bytes, key: int, row: int | None, arrival: float | None = None) -> None:
        """One compound RTCP packet from ``key`` (``row`` known when it came on the RTP port)."""
        reports = parse_compound(data)
        if reports is None:
            self._count("rtcp", np.array([row]) if row is not None and row >= 0 else None)
            return
        if row is None or row < 0:
            row = self._rtcp_row(key, reports[0].ssrc)
            if row < 0:
                self._count("source")
                return
        media = self.media[row]
        assert media is not None
        state = media.rtcp
        if not state.mux and not state.latched:  # symmetric RTCP: answer where it came from
            self.set_rtcp_remote(row, key_address(key))
            state.latched = True
        now = time.time() if arrival is None else arrival
        for report in reports:
            state.heard(report, int(self.tx_ssrc[row]), now)

    def _rtcp_row(self, key: int, ssrc: int) -> int:
        """Which leg an RTCP packet on the RTCP port belongs to: by its source, else by SSRC."""
        row = self.rtcp_source.get(key, -1)
        if row < 0:
            row = self.by_source.get(key - 1, -1)  # RTP port + 1, the usual pairing
        if row >= 0:
            return row
        rows = self.active[self.streams.ssrc[self.active] == ssrc]
        hosts = [r for r in rows.tolist() if int(self.dest[r]) >> 16 == key >> 16]
        return hosts[0] if len(hosts) == 1 else -1

    def _send_reports(self) -> None:
        """SR (we always send) per leg every ``rtcp_ticks``, spread evenly over the ticks."""
        rows = self.active
        due = rows[(rows + self._k) % self.rtcp_ticks == 0]
        if due.size == 0:
            return
        now = time.time()
        ntp = ntp_now(now)
        streams = self.streams
        for row in due.tolist():
            media = self.media[row]
            if media is None or self.packets_out[row] == 0:
                continue
            state = media.rtcp
            target = media.remote if state.mux else state.remote
            if target is None:
                continue
            block = None
            if streams.ssrc[row] != -1:
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
                block = ReportBlock(
                    ssrc=int(streams.ssrc[row]),
                    fraction_lost=min(fraction, 255),
                    cumulative_lost=expected - received,
                    highest_seq=streams.extended_max(row),
                    jitter=int(streams.jitter[row]),
                    lsr=state.last_sr,
                    dlsr=state.dlsr(now),
                )
            sender = (
                ntp,
                int(self.tx_ts[row]),
                int(self.packets_out[row]),
                int(self.payload_out[row]),
            )
            packet = build_report(int(self.tx_ssrc[row]), self.cname, sender, block)
            try:
                (self.sock if state.mux else self.rtcp_sock).sendto(packet, target)
                state.reports_out += 1
            except OSError:
                media.send_errors += 1

    # --- send (after the tick) --------------------------------------------------------

    def send(self) -> None:
        """Encode every leg's frame; headers as columns; one ``sendmmsg`` for all legs."""
        started = time.thread_time()
        try:
            self._send()
        finally:
            self.cpu_seconds["send"] += time.thread_time() - started

    def _send(self) -> None:
        rows = self.active
        if rows.size == 0:
            return
        sel = dense(rows)
        has = self.tx_has[sel]
        if not has.all():  # no audio for these: silence (and silence in their history)
            self.tx[rows[~has]] = 0.0
        self.tx_has[sel] = False
        if self.down is not None:
            ext = self.tx_ext[sel]  # a view when the rows are dense
            frames = self.down.process_ext(ext)
            h = self.down.history_length
            if isinstance(sel, slice):
                self.tx_ext[sel, :h] = self.tx_ext[sel, -h:]
            else:
                self.tx_ext[rows, :h] = ext[:, -h:]
        else:
            frames = self.tx[sel]
        # To 16-bit (truncating: G.711's coarsest step hides the half-LSB) in place.
        scaled = np.multiply(frames, np.float32(32768.0), dtype=np.float32)
        pcm = np.clip(scaled, -32768, 32767, out=scaled).astype(np.int16)
        n = self.codec_frame
        count = len(rows)
        size = HEADER_SIZE + n
        packets = np.empty((count, size), np.uint8)
        laws = self.law[sel]
        if (laws == laws[0]).all():
            packets[:, HEADER_SIZE:] = ENCODE[laws[0]].take(pcm.view(np.uint16))
        else:
            packets[:, HEADER_SIZE:] = ENCODE.reshape(-1).take(
                pcm.view(np.uint16).astype(np.int64) + (laws * 65536)[:, None]
            )
        packets[:, 0] = 0x80
        packets[:, 1] = self.tx_pt[sel] | (self.tx_first[sel].astype(np.uint8) << 7)
        packets[:, 2:4] = self.tx_seq[sel].astype(">u2").view(np.uint8).reshape(count, 2)
        packets[:, 4:8] = self.tx_ts[sel].astype(">u4").view(np.uint8).reshape(count, 4)
        packets[:, 8:12] = self.tx_ssrc[sel].astype(">u4").view(np.uint8).reshape(count, 4)
        dest = self.dest[sel]
        busy = self.busy[sel]
        audio = (dest != NO_PEER) & ~busy
        if audio.all():
            ok = self.sender.send(packets, dest)
            done = rows[ok]
        else:
            pick = np.flatnonzero(audio)
            ok = self.sender.send(np.ascontiguousarray(packets[pick]), dest[pick])
            done = rows[pick[ok]]
        if not ok.all():
            for row in rows[audio][~ok].tolist():
                media = self.media[row]
                if media is not None:
                    media.send_errors += 1
        for row in rows[busy].tolist():
            media = self.media[row]
            if media is not None and media.remote is not None:
                self._send_dtmf(row, media)
        self.tx_seq[done] = (self.tx_seq[done] + 1) & 0xFFFF
        self.tx_first[done] = False
        self.packets_out[done] += 1
        self.bytes_out[done] += size
        self.payload_out[done] += n
        self.tx_ts[rows] = (self.tx_ts[rows] + n) & 0xFFFFFFFF
        self._send_reports()

    def queue_dtmf(self, row: int, digits: str) -> None:
        """RFC 4733 digits toward the phone; sent instead of audio on the next ticks."""
        media = self.media[row]
        if media is None:
            return
        media.dtmf_out.extend(d for d in digits if d in "0123456789*#ABCD")
        self.busy[row] = bool(media.dtmf_out or media.dtmf_sending)

    def _send_dtmf(self, row: int, media: LegMedia) -> None:
        """RFC 4733 send: one event per digit, 100 ms, then three end packets."""
        if media.dtmf_type is None or media.remote is None:
            media.dtmf_out.clear()
            media.dtmf_sending = None
            self.busy[row] = False
            return
        if media.dtmf_sending is None:
            media.dtmf_sending = (media.dtmf_out.pop(0), int(self.tx_ts[row]), 0)
        digit, start, sent = media.dtmf_sending
        sent += self.codec_frame
        end = sent >= DTMF_SEND_SECONDS * CODEC_RATE
        for _ in range(3 if end else 1):
            seq = int(self.tx_seq[row])
            header = build_header(
                media.dtmf_type, sent == self.codec_frame, seq, start, int(self.tx_ssrc[row])
            )
            packet = header + build_event(digit, end, sent)
            try:
                self.sock.sendto(packet, media.remote)
            except OSError:
                media.send_errors += 1
                continue
            self.tx_seq[row] = (seq + 1) & 0xFFFF
            self.packets_out[row] += 1
            self.bytes_out[row] += len(packet)
            self.payload_out[row] += len(packet) - HEADER_SIZE
        media.dtmf_sending = None if end else (digit, start, sent)
        self.busy[row] = bool(media.dtmf_out or media.dtmf_sending)

    # --- per leg ---------------------------------------------------------------------

    def stats(self, row: int) -> dict[str, float]:
        media = self.media[row]
        if media is None:
            return {}
        streams = self.streams
        return {
            "packets_in": int(self.packets_in[row]),
            "packets_out": int(self.packets_out[row]),
            "bytes_in": int(self.bytes_in[row]),
            "bytes_out": int(self.bytes_out[row]),
            "packets_lost": int(streams.lost_of(row) + streams.lost_before[row]),
            "packets_late": int(self.jitter.packets_late[row]),
            "packets_malformed": media.malformed,
            "jitter_seconds": float(streams.jitter[row]) / CODEC_RATE,
            "concealed_samples": int(self.jitter.concealed[row]) * self.factor,
            "jitter_buffer_seconds": max(0.0, float(self.jitter.delay[row]) / CODEC_RATE),
            "rtcp_reports_in": media.rtcp.reports_in,
            "rtcp_reports_out": media.rtcp.reports_out,
            # What the far end reports of our stream, and the round trip (once it echoed an SR).
            "remote_packets_lost": media.rtcp.remote_lost,
            "remote_jitter_seconds": media.rtcp.remote_jitter / CODEC_RATE,
            **({"rtt_seconds": media.rtcp.rtt} if media.rtcp.rtt is not None else {}),
        }
