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

import numpy as np

from gateway.codecs.g711 import alaw_decode, ulaw_decode
from gateway.sip.columns import Column
from gateway.sip.jitter import JitterBank, dense
from gateway.sip.legmedia import LegMedia
from gateway.sip.mmsg import BatchReceiver
from gateway.sip.resample import BlockResampler
from gateway.sip.rtcp import is_rtcp
from gateway.sip.rtp import parse_event, parse_rtp
from gateway.sip.streams import NO_SSRC, StreamBank

CODEC_RATE = 8000
HEADER_SIZE = 12
MAX_PAYLOAD = 1200  # 150 ms of G.711, our a=maxptime
MAX_PACKET = 1500
COMFORT_NOISE = 13  # RFC 3389: accepted and ignored, not counted as malformed
SILENCE_DB = -120.0
NO_PEER = -1  # address key of a leg whose peer address is not known
SSRC_HANDOVER = 1.0  # seconds a locked SSRC must be silent before another one replaces it
UNKNOWN, ADDRESS_ONLY, ANY_SSRC, EXACT = -1, 0, 1, 2  # how LegBank.lookup matched a packet

# Why a packet was dropped (bank-wide counters, and per leg when the sender is known).
MALFORMED_KINDS = (
    "truncated",  # shorter than an RTP header
    "huge",  # longer than any voice packet we agreed to
    "version",  # not RTP version 2 (garbage usually lands here)
    "layout",  # CSRC list, extension or padding pointing past the end; no payload
    "payload_type",  # a payload type the call did not agree on
    "event",  # a telephone-event that is not a DTMF key
    "source",  # from an address that is no call's peer (stray or spoofed)
    "ssrc",  # from a call's address with an SSRC that is not the call's (injected)
    "rtcp",  # RTCP that does not parse (lengths past the end, not SR/RR first)
    "srtp_auth",  # on an SRTP call: not authenticated by the call's key (forged, plain, cut)
    "srtp_replay",  # on an SRTP call: a packet already received (replayed or duplicated)
    "opus",  # on an Opus call: not a 20 ms Opus packet, or one libopus cannot decode
)

# µ-law (row 0) and A-law (row 1) code → float sample: decoding is one gather.
_CODES = np.arange(256, dtype=np.uint8)
DECODE = np.stack([ulaw_decode(_CODES), alaw_decode(_CODES)]).astype(np.float32) / 32768.0


class ReceivePath:
    """Mixin of :class:`gateway.sip.bank.LegBank`: the receive half of every leg.

    Its per-leg columns are :meth:`_rx_columns`. Of the rest of the bank it uses the
    attributes declared below and, from the bank, ``_tick_time()`` (this tick's ideal
    time), ``lookup(keys, ssrcs)`` ((address, SSRC) → row), ``lock(row, ssrc)``,
    ``may_hand_over(row)``, ``_waiting_rows()`` (legs whose phone has not sent yet)
    and ``_latch(row, key, ssrc)``; from the RTCP part, ``drain_rtcp()`` and
    ``_rtcp()`` for reports multiplexed on the RTP port."""

    # The bank's rows and addresses, and the parts it composes (see gateway.sip.bank).
    media: list[LegMedia | None]
    active: np.ndarray
    dest: np.ndarray
    latched: np.ndarray
    rx_ssrc: np.ndarray
    rtp_at: np.ndarray
    now: float
    payload_type: np.ndarray
    law: np.ndarray
    frame: int
    jitter: JitterBank
    streams: StreamBank
    receiver: BatchReceiver
    up: BlockResampler | None
    malformed: dict[str, int]  # dropped packets by kind (MALFORMED_KINDS)
    srtp_legs: int  # legs with SRTP: their packets are checked first (bank_srtp)
    opus_legs: int  # legs with Opus: decoded one by one at playout (bank_opus)
    opus: np.ndarray  # column: the leg's codec is Opus
    epoch_seconds: int
    _epoch_ns: int
    _k: int  # ticks since the bank started
    # Columns of this path (filled by the bank from _rx_columns).
    rx: np.ndarray
    up_hist: np.ndarray
    talking: np.ndarray
    vox: np.ndarray
    ptt: np.ndarray
    peer_keyed: np.ndarray
    muted: np.ndarray
    vox_threshold: np.ndarray
    vox_hang: np.ndarray
    vox_hold: np.ndarray
    level_db: np.ndarray
    packets_in: np.ndarray
    bytes_in: np.ndarray
    ext_in: np.ndarray  # (bank_ext) the leg's owner reads header extensions

    def _rx_columns(self) -> tuple[Column, ...]:
        hist_up = self.up.history_length if self.up else 0
        return (
            ("rx", (self.frame,), np.float32, 0.0),  # what each leg says, at the engine rate
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

    def _receive(self) -> None:
        """Before the tick: every leg's frame into ``rx`` and its talking flag set."""
        now = self._tick_time()
        self._k += 1
        self.now = time.time()
        self.drain()
        self.drain_rtcp()
        rows = self.active
        if rows.size == 0:
            return
        sel = dense(rows)
        wide = None
        if self.opus_legs:  # Opus legs: the jitter bank times them, bank_opus decodes
            wide = np.flatnonzero(self.opus[rows])
            concealed = self.jitter.concealed[rows[wide]]
        pcm = self.jitter.playout(rows, now, self.talking[sel], DECODE, self.law)
        rms = np.sqrt(np.einsum("ij,ij->i", pcm, pcm) / pcm.shape[1])
        level = 20.0 * np.log10(np.maximum(rms, 1e-6))
        if wide is not None and wide.size:
            frames, level[wide] = self._opus_playout(rows[wide], concealed, now)
        self.level_db[sel] = level
        voice = level > self.vox_threshold[sel]
        hold = np.where(voice, self.vox_hang[sel] + 1, np.maximum(self.vox_hold[sel] - 1, 0))
        self.vox_hold[sel] = hold
        talking = np.where(self.vox[sel], hold > 0, self.ptt[sel]) | self.peer_keyed[sel]
        talking &= ~self.muted[sel]
        self.talking[sel] = talking
        if self.up is not None:
            out, self.up_hist[sel] = self.up.process(pcm, self.up_hist[sel])
            self.rx[sel] = out
        else:
            self.rx[sel] = pcm
        if wide is not None and wide.size:
            self.rx[rows[wide]] = frames

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

    # --- dropped packets --------------------------------------------------------------

    def _count(self, kind: str, rows: np.ndarray | None = None, amount: int = 1) -> None:
        """``amount`` packets dropped as ``kind``; ``rows``: the legs they came from."""
        self.malformed[kind] += amount
        if rows is not None:
            for row in rows.tolist():
                media = self.media[row]
                if media is not None:
                    media.malformed += 1

    def _drop(self, kind: str, row: int) -> None:
        """One packet dropped as ``kind``, from leg ``row`` (or from nobody's address: -1)."""
        self._count(kind, np.array([row]) if row >= 0 else None)

    # --- one batch, as columns --------------------------------------------------------

    def _batch(self, n: int) -> None:
        """Check, demultiplex and account ``n`` received datagrams, all as columns."""
        length, truncated, source, arrival_ns = self.receiver.columns(n)
        data = self.receiver.data[:n]
        if self.srtp_legs:  # SRTP calls' packets checked and decrypted in place (bank_srtp)
            keep = self._unprotect_batch(data, length, truncated, source)
            if keep is not None:  # the ones that failed are counted and gone
                data, length, truncated = data[keep], length[keep], truncated[keep]
                source, arrival_ns = source[keep], arrival_ns[keep]
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
        rtcp = (b1 >= 192) & (b1 <= 223)  # RTCP on the RTP port: its sender SSRC is at 4
        h = np.where(rtcp[:, None], head[:, 4:8], head[:, 8:12]).astype(np.int64)
        ssrc = (h[:, 0] << 24) | (h[:, 1] << 16) | (h[:, 2] << 8) | h[:, 3]
        rows, match = self.lookup(source, ssrc)  # which leg: by source address and SSRC
        if self.ext_in[rows[rows >= 0]].any():  # header extensions (a link's talker): bank_ext
            self._take_extensions(data, length, head, rows, match)
        known = rows >= 0
        for kind, mask in (("huge", huge), ("truncated", short), ("version", wrong_version)):
            if mask.any():
                self._count(kind, rows[mask & known], int(mask.sum()))
        # The common packet: plain header, the agreed codec, from a known peer and SSRC.
        pt = (b1 & 0x7F).astype(np.int64)
        fast = (
            good
            & (match == EXACT)
            & (b0 == 0x80)
            & (length > HEADER_SIZE)
            & (length <= HEADER_SIZE + MAX_PAYLOAD)
            & (pt == self.payload_type[rows])
        )
        if fast.any():
            self._audio(np.flatnonzero(fast), rows, length, arrival, data, head)
        rest = good & ~fast
        stray = rest & (match == UNKNOWN)
        if stray.any():  # from nobody's address: only a host with a call waiting may latch
            waiting_hosts = self.dest[self._waiting_rows()] >> 16
            hopeless = stray & ~np.isin(source >> 16, waiting_hosts) & ~rtcp
            if hopeless.any():
                self._count("source", None, int(hopeless.sum()))
                rest &= ~hopeless
        # A call's address with another SSRC: an injection unless the call may hand over.
        foreign = rest & (match == ADDRESS_ONLY) & ~rtcp
        if foreign.any():
            sole = rows[foreign]
            may = sole >= 0
            may[may] = self.now - self.rtp_at[sole[may]] >= SSRC_HANDOVER
            refused = np.flatnonzero(foreign)[~may]
            if refused.size:
                self._count("ssrc", None, int(refused.size))
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
        head: np.ndarray,
    ) -> None:
        """Audio packets ``idx`` of a batch into their rows, in rounds of distinct rows."""
        rows = rows_of[idx]
        self.latched[rows] = True  # from the SDP address: symmetric RTP already holds
        self.rtp_at[rows] = self.now
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
                rows[pick],
                ssrc[pick],
                seq[pick],
                ts[pick],
                arrival[idx[pick]],
                marker[pick],
                data,
                idx[pick],
                size[pick],
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
        if self.opus_legs:  # Opus legs' packets go their own way (bank_opus)
            wide = self.opus[rows]
            if wide.any():
                w = np.flatnonzero(wide)
                self._opus_packets(
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
        if is_rtcp(data[1]):  # RTCP multiplexed on the RTP port (RFC 5761): by its sender SSRC
            self._rtcp(data, key, row, self.epoch_seconds + arrival / CODEC_RATE)
            return
        packet = parse_rtp(data)
        if packet is None:
            self._drop("layout", row)
            return
        if row < 0:
            row = self._claim(key, packet.ssrc)
            if row < 0:
                return
        media = self.media[row]
        assert media is not None
        locked = int(self.rx_ssrc[row])
        if not media.announced and locked != packet.ssrc:
            if locked == NO_SSRC:  # the call's first packet: its SSRC from now on
                self.lock(row, packet.ssrc)
            else:  # a second SSRC in the same batch as the first: not this call's
                self._drop("ssrc", -1)
                return
        elif media.announced and packet.ssrc not in media.announced:
            self._drop("ssrc", -1)
            return
        self.rtp_at[row] = self.now
        if self.ext_in[row]:
            self._one_extension(row, data)
        pt = packet.payload_type
        if pt == media.payload_type:
            if len(packet.payload) > MAX_PAYLOAD:
                self._drop("huge", row)
                return
            if key != self.dest[row]:
                self._latch(row, key)
            self.latched[row] = True
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
                self._drop("event", row)
                return
            self._dtmf(media, packet.timestamp, event.digit, event.end)
        elif pt != COMFORT_NOISE:
            self._drop("payload_type", row)
            return
        self.packets_in[row] += 1
        self.bytes_in[row] += len(data)

    def _claim(self, key: int, ssrc: int) -> int:
        """The row of a packet that matched no (address, SSRC) key, or -1 (counted).

        From a call's address: the call's new SSRC if the old one stopped (RFC 3550
        handover, :meth:`may_hand_over`). From an address no leg knows: the one
        unlatched leg expecting its host, whose peer announced this SSRC or none — a
        phone behind NAT sends from another port than its SDP says.
        """
        at = self.rows_at(key)
        if at:
            if len(at) == 1 and self.may_hand_over(at[0]):
                self.lock(at[0], ssrc)
                return at[0]
            self._drop("ssrc", -1)
            return -1
        waiting = self._waiting_rows()
        rows = [
            row
            for row in waiting[(self.dest[waiting] >> 16) == key >> 16].tolist()
            if not self.media[row].announced or ssrc in self.media[row].announced
        ]
        if len(rows) != 1:
            self._drop("source", -1)
            return -1
        row = rows[0]
        self._latch(row, key, ssrc)
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
