"""The leg bank: the media of every SIP call, received and sent once per engine tick.

Why a bank: the budget is ≤ 25 µs of CPU per leg per 20 ms frame, everything
included. Per-call threads pacing RTP with sleeps (pyVoIP's way) cost more than
that and drift off the engine's clock. Here every call is a row in shared arrays:

* before the tick, every RTP socket with data is drained in one pass (one
  ``epoll`` poll, one ``recvmsg`` per packet with the kernel's arrival time, so
  draining once per tick does not blur the jitter measurement); each packet is
  checked, counted and written into its row of the jitter bank;
* then one gather + one table lookup decodes G.711 for all legs, one matrix
  product resamples them to the engine rate, and VOX is one vector compare;
* after the tick, the engine's frames for all legs are resampled and encoded in
  one go, and each leg's packet is sent from its own socket (symmetric RTP:
  to the address the phone sends from, once it has sent).

The only per-packet Python is header parsing and the socket calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gateway.codecs.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from gateway.sip.jitter import JitterBank
from gateway.sip.resample import BlockResampler
from gateway.sip.rtp import (
    PCMA,
    PCMU,
    ReceiveStats,
    build_event,
    build_header,
    parse_event,
    parse_rtp,
)

log = logging.getLogger(__name__)

CODEC_RATE = 8000
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)
COMFORT_NOISE = 13  # RFC 3389: accepted and ignored, not counted as malformed
DTMF_SEND_SECONDS = 0.1
HEADER_SIZE = 12
MAX_PAYLOAD = 1200  # 150 ms of G.711, our a=maxptime
_RTP_HEADER = struct.Struct("!BBHII")
SILENCE_DB = -120.0

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
    """One leg's RTP state that is not a per-tick array: sockets, addresses, counters."""

    sock: socket.socket
    payload_type: int
    dtmf_type: int | None
    remote: tuple[str, int] | None
    on_dtmf: Callable[[str, bool], None] | None = None
    latched: bool = False
    rx: ReceiveStats = field(default_factory=ReceiveStats)
    packets_in: int = 0
    bytes_in: int = 0
    malformed: int = 0
    send_errors: int = 0
    event_ts: int | None = None  # RTP timestamp of the DTMF event being received
    event_ended: bool = True
    dtmf_out: list[str] = field(default_factory=list)
    dtmf_sending: tuple[str, int, int] | None = None  # digit, start ts, samples sent
    loop: asyncio.AbstractEventLoop | None = None  # whose reader serves the socket
    peer: tuple[str, int] | None = None  # the latched source (None until the first packet)


class LegBank:
    """Rows of SIP media; the service calls :meth:`receive` before and :meth:`send` after a tick."""

    def __init__(
        self, rate: int, frame_samples: int, frame_seconds: float, capacity: int = 64
    ) -> None:
        if rate % CODEC_RATE:
            raise ValueError(f"SIP needs an engine rate that is a multiple of 8000 Hz, not {rate}")
        self.rate = rate
        self.frame = frame_samples
        self.frame_seconds = frame_seconds
        self.codec_frame = round(CODEC_RATE * frame_seconds)
        self.factor = rate // CODEC_RATE
        self.jitter = JitterBank(capacity, self.codec_frame, CODEC_RATE)
        if self.factor > 1:
            self.up: BlockResampler | None = BlockResampler(self.factor, self.codec_frame, up=True)
            self.down: BlockResampler | None = BlockResampler(
                self.factor, self.codec_frame, up=False
            )
        else:
            self.up = self.down = None
        self.media: list[LegMedia | None] = []
        self.free: list[int] = []
        self.fd_row: dict[int, int] = {}
        self.poller = select.epoll()
        self.epoch_seconds = int(time.time())  # whole seconds: arrivals keep ns precision
        self._t0: float | None = None
        self._k = 0
        self._allocate(capacity)
        self.active = np.zeros(0, np.int64)

    def _allocate(self, capacity: int) -> None:
        old = self.__dict__.copy() if hasattr(self, "rx") else None
        self.capacity = capacity
        self.jitter.grow(capacity)
        hist_up = self.up.history_length if self.up else 0
        hist_down = self.down.history_length if self.down else 0
        self.rx = np.zeros((capacity, self.frame), np.float32)
        self.tx = np.zeros((capacity, self.frame), np.float32)
        self.tx_has = np.zeros(capacity, bool)
        self.up_hist = np.zeros((capacity, hist_up), np.float32)
        self.down_hist = np.zeros((capacity, hist_down), np.float32)
        self.law = np.zeros(capacity, np.int64)
        self.talking = np.zeros(capacity, bool)
        self.vox = np.ones(capacity, bool)  # VOX keying (False: DTMF PTT)
        self.ptt = np.zeros(capacity, bool)  # DTMF PTT pressed
        self.muted = np.zeros(capacity, bool)  # PIN not yet entered
        self.vox_threshold = np.full(capacity, -40.0, np.float32)
        self.vox_hang = np.zeros(capacity, np.int64)
        self.vox_hold = np.zeros(capacity, np.int64)
        self.level_db = np.full(capacity, SILENCE_DB, np.float32)
        # What we send, per row: RTP header fields and counters, updated in batches.
        self.tx_seq = np.zeros(capacity, np.int64)
        self.tx_ts = np.zeros(capacity, np.int64)
        self.tx_ssrc = np.zeros(capacity, np.int64)
        self.tx_pt = np.zeros(capacity, np.uint8)
        self.tx_first = np.zeros(capacity, bool)
        self.packets_out = np.zeros(capacity, np.int64)
        self.bytes_out = np.zeros(capacity, np.int64)
        if old is not None:
            n = old["capacity"]
            for name in (
                "rx",
                "tx",
                "tx_has",
                "up_hist",
                "down_hist",
                "law",
                "talking",
                "vox",
                "ptt",
                "muted",
                "vox_threshold",
                "vox_hang",
                "vox_hold",
                "level_db",
                "tx_seq",
                "tx_ts",
                "tx_ssrc",
                "tx_pt",
                "tx_first",
                "packets_out",
                "bytes_out",
            ):
                getattr(self, name)[:n] = old[name]

    # --- rows -------------------------------------------------------------------------

    def add(self, media: LegMedia) -> int:
        """Give a leg a row; its socket must be bound and non-blocking."""
        if self.free:
            row = self.free.pop()
            self.media[row] = media
        else:
            row = len(self.media)
            self.media.append(media)
            if row >= self.capacity:
                self._allocate(self.capacity * 2)
        self.jitter.reset(row)
        for name in ("rx", "tx", "up_hist", "down_hist"):
            getattr(self, name)[row] = 0.0
        self.tx_has[row] = False
        self.talking[row] = self.ptt[row] = self.muted[row] = False
        self.vox_hold[row] = 0
        self.level_db[row] = SILENCE_DB
        self.law[row] = _LAWS[media.payload_type]
        self.tx_seq[row] = random.getrandbits(16)
        self.tx_ts[row] = random.getrandbits(32)
        self.tx_ssrc[row] = random.getrandbits(32)
        self.tx_pt[row] = media.payload_type
        self.tx_first[row] = True
        self.packets_out[row] = self.bytes_out[row] = 0
        media.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        media.sock.setblocking(False)
        fd = media.sock.fileno()
        self.fd_row[fd] = row
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:  # read as packets come (uvloop): arrival times stay exact
            loop.add_reader(fd, self._readable, row)
            media.loop = loop
        else:  # no loop (tools, unit use): drained before each tick instead
            self.poller.register(fd, select.EPOLLIN)
        self._update_active()
        return row

    def remove(self, row: int) -> None:
        media = self.media[row]
        if media is None:
            return
        fd = media.sock.fileno()
        if fd >= 0:
            self.fd_row.pop(fd, None)
            if media.loop is not None:
                with contextlib.suppress(Exception):
                    media.loop.remove_reader(fd)
            else:
                with contextlib.suppress(OSError, ValueError):
                    self.poller.unregister(fd)
        media.sock.close()
        self.media[row] = None
        self.free.append(row)
        self._update_active()

    def _update_active(self) -> None:
        self.active = np.array([i for i, m in enumerate(self.media) if m is not None], np.int64)

    def close(self) -> None:
        for row, media in enumerate(self.media):
            if media is not None:
                self.remove(row)
        self.poller.close()

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

    # --- receive (before the tick) --------------------------------------------------

    def receive(self) -> None:
        now = self._tick_time()
        self.drain()
        rows = self.active
        if rows.size == 0:
            return
        pcm = self.jitter.playout(rows, now, self.talking[rows], DECODE, self.law)
        rms = np.sqrt(np.mean(np.square(pcm), axis=1))
        level = 20.0 * np.log10(np.maximum(rms, 1e-6))
        self.level_db[rows] = level
        voice = level > self.vox_threshold[rows]
        hold = np.where(voice, self.vox_hang[rows] + 1, np.maximum(self.vox_hold[rows] - 1, 0))
        self.vox_hold[rows] = hold
        talking = np.where(self.vox[rows], hold > 0, self.ptt[rows]) & ~self.muted[rows]
        self.talking[rows] = talking
        if self.up is not None:
            out, self.up_hist[rows] = self.up.process(pcm, self.up_hist[rows])
            self.rx[rows] = out
        else:
            self.rx[rows] = pcm

    def _readable(self, row: int) -> None:
        """The loop's reader for one leg: one datagram per call (level-triggered, so a
        second queued datagram calls again) — no failing read, no exception per tick.

        The common packet (plain RTP header, the agreed codec, from the latched
        peer) takes a short path; anything else goes through the full checks.
        """
        media = self.media[row]
        if media is None:
            return
        try:
            data, ancillary, _, source = media.sock.recvmsg(2048, ANCILLARY)
        except OSError:  # nothing after all, or ICMP unreachable from a phone that left
            return
        if ancillary and ancillary[0][1] == SO_TIMESTAMPNS:
            sec, nsec = _TIMESPEC.unpack_from(ancillary[0][2])
            arrival = ((sec - self.epoch_seconds) + nsec * 1e-9) * CODEC_RATE
        else:
            arrival = (time.time() - self.epoch_seconds) * CODEC_RATE
        size = len(data)
        if HEADER_SIZE < size <= HEADER_SIZE + MAX_PAYLOAD and source == media.peer:
            b0, b1, sequence, timestamp, ssrc = _RTP_HEADER.unpack_from(data)
            if b0 == 0x80 and b1 & 0x7F == media.payload_type:
                media.packets_in += 1
                media.bytes_in += size
                if media.rx.update(ssrc, sequence, timestamp, arrival):
                    self.jitter.resync(row)
                payload = memoryview(data)[HEADER_SIZE:]
                if not self.jitter.put(row, timestamp, payload, arrival) and b1 & 0x80:
                    self.jitter.resync(row)  # a talkspurt restarting its clock: follow it
                    self.jitter.put(row, timestamp, payload, arrival)
                return
        self._packet(row, media, data, source, arrival)

    def drain(self) -> None:
        """Read every queued datagram of every leg (one pass; nothing waits on a socket)."""
        poll = self.poller.poll
        fd_row = self.fd_row
        media_of = self.media
        while True:
            events = poll(0)
            if not events:
                return
            for fd, _ in events:
                row = fd_row.get(fd)
                if row is None:
                    continue
                media = media_of[row]
                try:
                    data, ancillary, _, source = media.sock.recvmsg(2048, ANCILLARY)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:  # ICMP port unreachable from a phone that went away
                    continue
                arrival = None
                for level, kind, blob in ancillary:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = _TIMESPEC.unpack_from(blob)
                        arrival = sec + nsec * 1e-9
                if arrival is None:
                    arrival = time.time()
                self._packet(row, media, data, source, (arrival - self.epoch_seconds) * CODEC_RATE)

    def _packet(
        self, row: int, media: LegMedia, data: bytes, source: tuple, arrival: float
    ) -> None:
        packet = parse_rtp(data)
        if packet is None:
            media.malformed += 1
            return
        if media.latched and source != media.remote:
            media.malformed += 1  # not our peer: a stray or spoofed stream
            return
        pt = packet.payload_type
        if pt == media.payload_type:
            if len(packet.payload) > MAX_PAYLOAD:
                media.malformed += 1
                return
            if not media.latched:  # symmetric RTP (RFC 4961): answer where it comes from
                media.remote = media.peer = source
                media.latched = True
            media.packets_in += 1
            media.bytes_in += len(data)
            if media.rx.update(packet.ssrc, packet.sequence, packet.timestamp, arrival):
                self.jitter.resync(row)
            if (
                not self.jitter.put(row, packet.timestamp, packet.payload, arrival)
                and packet.marker
            ):
                self.jitter.resync(row)
                self.jitter.put(row, packet.timestamp, packet.payload, arrival)
        elif pt == media.dtmf_type:
            event = parse_event(packet.payload)
            if event is None:
                media.malformed += 1
                return
            media.packets_in += 1
            media.bytes_in += len(data)
            self._dtmf(media, packet.timestamp, event.digit, event.end)
        elif pt == COMFORT_NOISE:
            media.packets_in += 1
            media.bytes_in += len(data)
        else:
            media.malformed += 1

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

    # --- send (after the tick) --------------------------------------------------------

    def send(self) -> None:
        """Encode every leg's frame and send one packet per leg (headers built in one go)."""
        rows = self.active
        if rows.size == 0:
            return
        frames = np.where(self.tx_has[rows, None], self.tx[rows], np.float32(0.0))
        self.tx_has[rows] = False
        if self.down is not None:
            frames, self.down_hist[rows] = self.down.process(frames, self.down_hist[rows])
        pcm = np.clip(np.rint(frames * 32768.0), -32768, 32767).astype(np.int16)
        n = self.codec_frame
        count = len(rows)
        packets = np.empty((count, HEADER_SIZE + n), np.uint8)
        laws = self.law[rows]
        if (laws == laws[0]).all():
            packets[:, HEADER_SIZE:] = ENCODE[laws[0]].take(pcm.view(np.uint16))
        else:
            packets[:, HEADER_SIZE:] = ENCODE.reshape(-1).take(
                pcm.view(np.uint16).astype(np.int64) + (laws * 65536)[:, None]
            )
        packets[:, 0] = 0x80
        packets[:, 1] = self.tx_pt[rows] | (self.tx_first[rows].astype(np.uint8) << 7)
        packets[:, 2:4] = self.tx_seq[rows].astype(">u2").view(np.uint8).reshape(count, 2)
        packets[:, 4:8] = self.tx_ts[rows].astype(">u4").view(np.uint8).reshape(count, 4)
        packets[:, 8:12] = self.tx_ssrc[rows].astype(">u4").view(np.uint8).reshape(count, 4)
        view = memoryview(packets.reshape(-1))
        size = HEADER_SIZE + n
        sent = np.zeros(count, bool)
        media_of = self.media
        for i, row in enumerate(rows.tolist()):
            media = media_of[row]
            if media is None or media.remote is None:
                continue
            if media.dtmf_out or media.dtmf_sending:
                self._send_dtmf(row, media)
                continue
            try:
                media.sock.sendto(view[i * size : (i + 1) * size], media.remote)
                sent[i] = True
            except OSError:
                media.send_errors += 1
        done = rows[sent]
        self.tx_seq[done] = (self.tx_seq[done] + 1) & 0xFFFF
        self.tx_first[done] = False
        self.packets_out[done] += 1
        self.bytes_out[done] += HEADER_SIZE + n
        self.tx_ts[rows] = (self.tx_ts[rows] + n) & 0xFFFFFFFF

    def _send_dtmf(self, row: int, media: LegMedia) -> None:
        """RFC 4733 send: one event per digit, 100 ms, then three end packets."""
        if media.dtmf_type is None:
            media.dtmf_out.clear()
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
                media.sock.sendto(packet, media.remote)
            except OSError:
                media.send_errors += 1
                continue
            self.tx_seq[row] = (seq + 1) & 0xFFFF
            self.packets_out[row] += 1
            self.bytes_out[row] += len(packet)
        media.dtmf_sending = None if end else (digit, start, sent)

    # --- per leg ---------------------------------------------------------------------

    def stats(self, row: int) -> dict[str, float]:
        media = self.media[row]
        if media is None:
            return {}
        return {
            "packets_in": media.packets_in,
            "packets_out": int(self.packets_out[row]),
            "bytes_in": media.bytes_in,
            "bytes_out": int(self.bytes_out[row]),
            "packets_lost": media.rx.lost + media.rx.lost_before,
            "packets_late": int(self.jitter.packets_late[row]),
            "packets_malformed": media.malformed,
            "jitter_seconds": media.rx.jitter / CODEC_RATE,
            "concealed_samples": int(self.jitter.concealed[row]) * self.factor,
            "jitter_buffer_seconds": max(0.0, float(self.jitter.delay[row]) / CODEC_RATE),
        }


def open_rtp_socket(host: str, port_range: tuple[int, int] | None = None) -> socket.socket:
    """A UDP socket for one leg's RTP: an even port in the range, or any free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    if port_range is None:
        sock.bind((host, 0))
        return sock
    low, high = port_range
    ports = list(range(low + (low & 1), high, 2))
    random.shuffle(ports)
    for port in ports[:200]:
        try:
            sock.bind((host, port))
            return sock
        except OSError:
            continue
    sock.close()
    raise OSError(f"no free RTP port in {low}-{high} on {host}; widen [sip] rtp_ports")
