"""The leg bank's receive path: every leg's RTP in, checked, demultiplexed, decoded, VOX-keyed.

Once per tick, before the engine mixes:

* ``recvmmsg`` drains every queued datagram of the shared RTP port, up to 1024 per
  system call, each with the kernel's arrival time (``SO_TIMESTAMPNS``), so draining
  once per tick does not blur the jitter measurement;
* packets of calls with SRTP are authenticated and decrypted in place first
  (:mod:`gateway.sip.bank_srtp`);
* the headers of the whole batch are read as NumPy columns: malformed packets are
  dropped and counted by kind, the sender is found by its source address and SSRC
  (one sorted-table lookup for all; see :mod:`gateway.sip.bank` for the rules), and
  the common packet — plain header, the agreed codec, from a known peer with its
  call's SSRC — goes into the receive statistics and the jitter buffers in rounds of
  distinct rows (a leg with two packets queued takes two rounds);
* then the jitter buffers play one frame per leg, one table lookup decodes G.711
  for all legs, one matrix product resamples them to the engine rate, and VOX
  (or DTMF PTT, or a PIN not yet entered) decides who is talking, as one vector step.

Per-packet Python runs only for the rare packets: RFC 4733 events, comfort noise,
RTCP multiplexed on the RTP port, RTP with header extensions/CSRCs/padding, the
first packet of a call (its SSRC is locked) and the first packet from a phone
behind NAT (latching, RFC 4961 symmetric RTP).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from gateway.codecs.g711 import alaw_decode, ulaw_decode
from gateway.sip import _rtpbatch
from gateway.sip.bank_ext import ExtensionEdges
from gateway.sip.bank_opus import OpusEdges
from gateway.sip.bank_rtcp import RtcpReports
from gateway.sip.bank_srtp import SrtpEdges
from gateway.sip.columns import Column
from gateway.sip.jitter import JitterBank, dense
from gateway.sip.legmedia import LegMedia
from gateway.sip.legtable import (
    ADDRESS_ONLY,
    CODEC_RATE,
    HEADER_SIZE,
    SILENCE_DB,
    SSRC_HANDOVER,
    UNKNOWN,
    LegTable,
)
from gateway.sip.mmsg import BatchReceiver, key_address
from gateway.sip.resample import BlockResampler
from gateway.sip.rtcp import is_rtcp
from gateway.sip.rtp import parse_event, parse_rtp
from gateway.sip.streams import NO_SSRC, StreamBank

MAX_PAYLOAD = 1200  # 150 ms of G.711, our a=maxptime
MAX_PACKET = 1500
COMFORT_NOISE = 13  # RFC 3389: accepted and ignored, not counted as malformed
# What _rtpbatch.classify makes of a packet: the common path, dropped (counted as
# "huge", "truncated", "version"), or the one-packet parser's.
FAST, HUGE, SHORT, VERSION, REST = range(5)

# µ-law (row 0) and A-law (row 1) code → float sample: decoding is one gather.
_CODES = np.arange(256, dtype=np.uint8)
DECODE = np.stack([ulaw_decode(_CODES), alaw_decode(_CODES)]).astype(np.float32) / 32768.0


class ReceivePath:
    """Part of :class:`gateway.sip.bank.LegBank`: the receive half of every leg.

    Its columns are :meth:`columns`. Each tick it drains the shared socket
    (``receiver``), finds each packet's row with the table's index, and hands the
    batch's edges to the other parts: SRTP checked first (``srtp_edges``), header
    extensions taken out (``extensions``), Opus legs timed and decoded apart
    (``opus_edges``), RTCP on the RTP port and the RTCP port to ``rtcp``. ``late_by``:
    how late the running tick is on the media clock's schedule."""

    def __init__(
        self,
        table: LegTable,
        jitter: JitterBank,
        streams: StreamBank,
        receiver: BatchReceiver,
        up: BlockResampler | None,
        srtp_edges: SrtpEdges,
        extensions: ExtensionEdges,
        opus_edges: OpusEdges,
        rtcp: RtcpReports,
        late_by: Callable[[], float],
    ) -> None:
        self.table = table
        self.jitter = jitter
        self.streams = streams
        self.receiver = receiver
        self.up = up
        self.srtp_edges = srtp_edges
        self.extensions = extensions
        self.opus_edges = opus_edges
        self.rtcp = rtcp
        self.late_by = late_by
        self.epoch_seconds = int(time.time())  # whole seconds: arrivals keep ns precision
        self._epoch_ns = self.epoch_seconds * 1_000_000_000

    @staticmethod
    def columns(frame: int, up: BlockResampler | None) -> tuple[Column, ...]:
        hist_up = up.history_length if up else 0
        return (
            ("rx", (frame,), np.float32, 0.0),  # what each leg says, at the engine rate
            ("up_hist", (hist_up,), np.float32, 0.0),  # resampler history
            ("talking", (), bool, False),
            ("vox", (), bool, True),  # VOX keying (False: DTMF PTT)
            ("ptt", (), bool, False),  # DTMF PTT pressed
            ("peer_keyed", (), bool, False),  # the peer says so (a link: talker extension)
            ("muted", (), bool, False),  # PIN not yet entered
            ("vox_threshold", (), np.float32, -40.0),
            ("vox_hang", (), np.int64, 0),
            ("vox_hold", (), np.int64, 0),
            ("level_db", (), np.float32, SILENCE_DB),
            ("packets_in", (), np.int64, 0),
            ("bytes_in", (), np.int64, 0),
        )

    # --- the tick ---------------------------------------------------------------------

    def receive(self) -> None:
        """Before the tick: every leg's frame into ``rx`` and its talking flag set."""
        t = self.table
        now = self.tick_time()
        t.ticks += 1
        t.now = time.time()
        self.drain()
        self.rtcp.drain()
        rows = t.active
        if rows.size == 0:
            return
        sel = dense(rows)
        narrow = None  # the G.711 rows among `rows` (None: all of them)
        if t.opus_legs:  # Opus legs: the jitter bank times them, bank_opus decodes
            wide = np.flatnonzero(t.opus[rows])
            narrow = np.flatnonzero(~t.opus[rows])
            concealed = self.jitter.concealed[rows[wide]]
        pcm = self.jitter.playout(rows, now, t.talking[sel], DECODE, t.law)
        if narrow is None:
            level = self._level(pcm)
        else:
            level = np.empty(len(rows), np.float32)
            frames, level[wide] = self.opus_edges.playout(rows[wide], concealed, now)
            level[narrow] = self._level(pcm[narrow])
        t.level_db[sel] = level
        voice = level > t.vox_threshold[sel]
        hold = np.where(voice, t.vox_hang[sel] + 1, np.maximum(t.vox_hold[sel] - 1, 0))
        t.vox_hold[sel] = hold
        talking = np.where(t.vox[sel], hold > 0, t.ptt[sel]) | t.peer_keyed[sel]
        talking &= ~t.muted[sel]
        t.talking[sel] = talking
        if narrow is None:
            t.rx[sel] = self._up(pcm, sel)
            return
        if narrow.size:  # G.711 beside Opus: only its rows are resampled
            t.rx[rows[narrow]] = self._up(pcm[narrow], rows[narrow])
        t.rx[rows[wide]] = frames

    def _up(self, pcm: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
        """G.711 frames (8 kHz) of ``rows`` at the engine rate (their history kept)."""
        if self.up is None:
            return pcm
        out, self.table.up_hist[rows] = self.up.process(pcm, self.table.up_hist[rows])
        return out

    @staticmethod
    def _level(pcm: np.ndarray) -> np.ndarray:
        rms = np.sqrt(np.einsum("ij,ij->i", pcm, pcm) / pcm.shape[1])
        return 20.0 * np.log10(np.maximum(rms, 1e-6))

    def drain(self) -> None:
        """Read the queued datagrams on the shared socket (never waits).

        At most a few ticks' worth for the calls up: a flood waits in (and overflows)
        the socket buffer instead of stretching this tick without end."""
        receiver = self.receiver
        for _ in range(2 + 4 * len(self.table.active) // receiver.slots):
            n = receiver.receive()
            if n:
                self._batch(n)
            if n < receiver.slots:
                return

    # --- one batch, as columns --------------------------------------------------------

    def _batch(self, n: int) -> None:
        """Check, demultiplex and account ``n`` received datagrams.

        The per-packet work is three C loops over the batch (``_rtpbatch``): which leg
        (by source address and SSRC, read in the clear in SRTP and SRTCP, so one search
        finds each packet's leg for the SRTP key and the demultiplexing both), which
        talker blocks are news, and each packet's class and header fields. Python runs
        per batch, and per packet only for the rare ones."""
        t = self.table
        length, truncated, source, arrival_ns = self.receiver.columns(n)
        data = self.receiver.data[:n]
        rows, match = t.lookup(source, data)  # which leg: by source address and SSRC
        if t.srtp_legs:  # SRTP calls' packets checked and decrypted in place (bank_srtp)
            keep = self.srtp_edges.unprotect_batch(data, length, truncated, source, rows)
            if keep is not None:  # the ones that failed are counted and gone
                data, length, truncated = data[keep], length[keep], truncated[keep]
                source, arrival_ns = source[keep], arrival_ns[keep]
                rows, match = rows[keep], match[keep]
                n = len(keep)
        arrival = (arrival_ns - self._epoch_ns) * (CODEC_RATE * 1e-9)
        ext_size = self.extensions.news(data, length, rows, match)  # a link's talker: bank_ext
        kind = np.empty(n, np.int64)
        seq, ts, ssrc, rank = (np.empty(n, np.int64) for _ in range(4))
        marker = np.empty(n, bool)
        rounds = _rtpbatch.classify(
            data,
            data.shape[1],
            length,
            truncated,
            rows,
            match,
            ext_size,
            t.payload_type,
            MAX_PACKET,
            MAX_PAYLOAD,
            kind,
            seq,
            ts,
            ssrc,
            marker,
            rank,
        )
        fast = np.flatnonzero(kind == FAST) if rounds else np.zeros(0, np.int64)
        if fast.size:
            self._audio(fast, rows, length, arrival, data, seq, ts, ssrc, marker, rank, rounds)
        if fast.size < n:
            self._rest(kind, rows, match, source, length, data, arrival)

    def _rest(
        self,
        kind: np.ndarray,
        rows: np.ndarray,
        match: np.ndarray,
        source: np.ndarray,
        length: np.ndarray,
        data: np.ndarray,
        arrival: np.ndarray,
    ) -> None:
        """The packets of a batch off the common path: the malformed counted, the strays
        and injections refused, the others to the one-packet parser."""
        t = self.table
        known = rows >= 0
        for code, name in ((HUGE, "huge"), (SHORT, "truncated"), (VERSION, "version")):
            mask = kind == code
            if mask.any():
                t.count(name, rows[mask & known], int(mask.sum()))
        rest = kind == REST
        if not rest.any():
            return
        b1 = data[:, 1]
        rtcp = (b1 >= 192) & (b1 <= 223)
        stray = rest & (match == UNKNOWN)
        if stray.any():  # from nobody's address: only a host with a call waiting may latch
            waiting_hosts = t.dest[t.waiting_rows()] >> 16
            hopeless = stray & ~np.isin(source >> 16, waiting_hosts) & ~rtcp
            if hopeless.any():
                t.count("source", None, int(hopeless.sum()))
                rest &= ~hopeless
        # A call's address with another SSRC: an injection unless the call may hand over.
        foreign = rest & (match == ADDRESS_ONLY) & ~rtcp
        if foreign.any():
            sole = rows[foreign]
            may = sole >= 0
            may[may] = t.now - t.rtp_at[sole[may]] >= SSRC_HANDOVER
            refused = np.flatnonzero(foreign)[~may]
            if refused.size:
                t.count("ssrc", None, int(refused.size))
                rest[refused] = False
        for i in np.flatnonzero(rest).tolist():
            row = int(rows[i]) if match[i] != ADDRESS_ONLY else -1
            self._packet(row, int(source[i]), bytes(data[i, : length[i]]), arrival[i])

    def _audio(
        self,
        idx: np.ndarray,
        rows_of: np.ndarray,
        length: np.ndarray,
        arrival: np.ndarray,
        data: np.ndarray,
        seq: np.ndarray,
        ts: np.ndarray,
        ssrc: np.ndarray,
        marker: np.ndarray,
        rank: np.ndarray,
        rounds: int,
    ) -> None:
        """Audio packets ``idx`` of a batch into their rows, in rounds of distinct rows
        (``rank``: the packets of the same row before each; ``rounds``: the most)."""
        t = self.table
        rows = rows_of[idx]
        t.latched[rows] = True  # from the SDP address: symmetric RTP already holds
        t.rtp_at[rows] = t.now
        if rounds == 1:  # distinct rows
            t.packets_in[rows] += 1
            t.bytes_in[rows] += length[idx]
        else:
            np.add.at(t.packets_in, rows, 1)
            np.add.at(t.bytes_in, rows, length[idx])
        size = length[idx] - HEADER_SIZE
        for k in range(rounds):
            pick = np.flatnonzero(rank[idx] == k) if rounds > 1 else np.arange(len(idx))
            at = idx[pick]
            self._put(
                rows[pick], ssrc[at], seq[at], ts[at], arrival[at], marker[at], data, at, size[pick]
            )

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
        t = self.table
        if t.opus_legs:  # Opus legs' packets go their own way (bank_opus)
            wide = t.opus[rows]
            if wide.any():
                w = np.flatnonzero(wide)
                self.opus_edges.packets(
                    rows[w], ssrc[w], seq[w], ts[w], arrival[w], marker[w], data, idx[w], size[w]
                )
                g = np.flatnonzero(~wide)
                if g.size == 0:
                    return
                rows, ssrc, seq, ts, arrival, marker, idx, size = (
                    a[g] for a in (rows, ssrc, seq, ts, arrival, marker, idx, size)
                )
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

    # --- the rare packet, one at a time -----------------------------------------------

    def _packet(self, row: int, key: int, data: bytes, arrival: float) -> None:
        """A packet off the common path: checked in full by the one-packet parser."""
        t = self.table
        if is_rtcp(data[1]):  # RTCP multiplexed on the RTP port (RFC 5761): by its sender SSRC
            self.rtcp.received(data, key, row, self.epoch_seconds + arrival / CODEC_RATE)
            return
        packet = parse_rtp(data)
        if packet is None:
            t.drop("layout", row)
            return
        if row < 0:
            row = self._claim(key, packet.ssrc)
            if row < 0:
                return
        media = t.media[row]
        assert media is not None
        locked = int(t.rx_ssrc[row])
        if not media.announced and locked != packet.ssrc:
            if locked == NO_SSRC:  # the call's first packet: its SSRC from now on
                t.lock(row, packet.ssrc)
            else:  # a second SSRC in the same batch as the first: not this call's
                t.drop("ssrc", -1)
                return
        elif media.announced and packet.ssrc not in media.announced:
            t.drop("ssrc", -1)
            return
        t.rtp_at[row] = t.now
        if t.ext_in[row]:
            self.extensions.one(row, data)
        pt = packet.payload_type
        if pt == media.payload_type:
            if len(packet.payload) > MAX_PAYLOAD:
                t.drop("huge", row)
                return
            if key != t.dest[row]:
                self.latch(row, key)
            t.latched[row] = True
            self._put(
                np.array([row]),
                np.array([packet.ssrc]),
                np.array([packet.sequence]),
                np.array([packet.timestamp]),
                np.array([arrival]),
                np.array([packet.marker]),
                np.frombuffer(bytes(12) + bytes(packet.payload), np.uint8).reshape(1, -1),
                np.array([0]),
                np.array([len(packet.payload)]),
            )
        elif pt == media.dtmf_type:
            event = parse_event(packet.payload)
            if event is None:
                t.drop("event", row)
                return
            self._dtmf(media, packet.timestamp, event.digit, event.end)
        elif pt != COMFORT_NOISE:
            t.drop("payload_type", row)
            return
        t.packets_in[row] += 1
        t.bytes_in[row] += len(data)

    def _claim(self, key: int, ssrc: int) -> int:
        """The row of a packet that matched no (address, SSRC) key, or -1 (counted).

        From a call's address: the call's new SSRC if the old one stopped (RFC 3550
        handover, :meth:`may_hand_over`). From an address no leg knows: the one
        unlatched leg expecting its host, whose peer announced this SSRC or none — a
        phone behind NAT sends from another port than its SDP says.
        """
        t = self.table
        at = t.rows_at(key)
        if at:
            if len(at) == 1 and t.may_hand_over(at[0]):
                t.lock(at[0], ssrc)
                return at[0]
            t.drop("ssrc", -1)
            return -1
        waiting = t.waiting_rows()
        rows = [
            row
            for row in waiting[(t.dest[waiting] >> 16) == key >> 16].tolist()
            if not t.media[row].announced or ssrc in t.media[row].announced
        ]
        if len(rows) != 1:
            t.drop("source", -1)
            return -1
        row = rows[0]
        self.latch(row, key, ssrc)
        return row

    def latch(self, row: int, key: int, ssrc: int = NO_SSRC) -> None:
        """Symmetric RTP (RFC 4961): answer where the phone really sends from."""
        table = self.table
        media = table.media[row]
        assert media is not None
        table.dest[row] = key
        if ssrc != NO_SSRC and not media.announced:
            table.rx_ssrc[row] = ssrc
        table.latched[row] = True
        media.remote = key_address(key)
        if media.rtcp.mux:
            self.rtcp.set_remote(row, media.remote)
        table.update()

    def tick_time(self) -> float:
        """This tick's ideal time (its deadline on the media clock), in codec samples
        since the epoch.

        The schedule, not the moment the loop woke up, keeps timer lateness out of the
        playout point; and it is the clock's own schedule, never a guess ahead of it: a
        playout point placed ahead of real time plays what has not arrived (every
        packet late, the call silent) until something moves it back.
        """
        return (time.time() - self.late_by() - self.epoch_seconds) * CODEC_RATE

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
