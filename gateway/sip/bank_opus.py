"""The leg bank's Opus legs: rows like any other, whose codec work is per leg.

For the engine an Opus leg is a row of the bank (its ``rx``/``tx`` frames at the
engine rate, keyed, mixed, metered like every call). What differs is only what
happens at the two edges of the batch (:mod:`gateway.sip.opus` holds each leg's
codec):

* receive: the packets go the common path (SRTP, header extension, demultiplexing,
  receive statistics) and into the jitter bank, which times them like G.711 —
  addressed by RTP time, in 8 kHz units (Opus's 48 kHz clock divided by six, unwrapped
  per leg so the division never meets the 32-bit wrap) — but with a placeholder in its
  ring, while the packet itself waits in the leg's :class:`~gateway.sip.opus.OpusLeg`.
  When the jitter bank plays a slot, the leg decodes that packet into the row's
  frame; a missing one is decoded from the next packet's in-band FEC if that has
  arrived (and carries FEC), else concealed by libopus. No packet is held back in case
  its successor's FEC is needed, as in WebRTC's NetEq: that would cost every link a
  packet time of delay, while on a WAN with jitter the buffer usually holds the next
  packet already (on a clean link a rare loss is concealed). A packet is one engine
  frame (10 or 20 ms; the SDP agreed on it): any other is dropped and counted
  (``opus``). Opus packets cannot be cut, so an Opus row's playout point moves in whole
  packets
  (:class:`~gateway.sip.jitter.JitterBank` ``whole``);
* send: each leg's ``tx`` frame is encoded by its own encoder (a silent one is not:
  :func:`~gateway.sip.opus.silence`), and the packets, of varying length, are built
  with their headers and talker extension by one C loop (``_rtpbatch.build``), get
  SRTP, and leave in one ``sendmmsg``.
  A leg whose owner lets it rest (:meth:`OpusEdges.may_rest`: a link leg carrying
  nobody keyed) sends its silence as Opus DTX does (RFC 7587 §3.3, WebRTC): after
  :data:`NEWS_PACKETS` silent packets in a row it sends one every
  :data:`REST_MS` only — the RTP time runs on, the sequence number does not, so
  the receiver counts no loss and plays silence in between. Ninety idle shared
  talkgroups then send 225 packets a second, not 4500, and neither side protects,
  sends, checks or demultiplexes the rest. Anything new (speech, the owner's new
  words in the header extension) goes out at once and is repeated on the next
  silent packets, so one lost packet does not hide it for a rest.

A bank with no Opus leg never runs any of this: the G.711 batch is as it was.
"""

from __future__ import annotations

import numpy as np

from gateway.sip.bank_ext import ExtensionEdges
from gateway.sip.bank_srtp import SrtpEdges
from gateway.sip.columns import Column
from gateway.sip.jitter import JitterBank
from gateway.sip.legtable import HEADER_SIZE, NO_PEER, SILENCE_DB, LegTable, write_packets
from gateway.sip.mmsg import BatchSender
from gateway.sip.opus import CLOCK, OpusLeg, packet_samples, silence
from gateway.sip.srtp import TAG as SRTP_TAG
from gateway.sip.streams import StreamBank

# A resting leg: after this many silent packets in a row (the news of a pause or of new
# header-extension words, repeated against a loss) ...
NEWS_PACKETS = 3
# ... one silent packet every 400 ms (Opus DTX's interval, RFC 7587 §3.3): the peer keeps
# hearing from the leg (its address, SSRC and RTCP figures stay alive). A time, not a count
# of ticks: at 10 ms frames a count of 20 sent twice the packets, and each costs both sides
# a protect, a send, a check and a demultiplexing (#15: the 10 ms CPU figure).
REST_MS = 400
_PLACEHOLDER = 0xFF  # µ-law silence in the jitter ring (never decoded for an Opus row)


class OpusEdges:
    """Part of :class:`gateway.sip.bank.LegBank`: Opus in at playout, out after the tick.

    Its columns are :meth:`columns`; it times packets in the ``jitter`` bank, keeps
    receive statistics in ``streams``, and sends its own batch with ``sender`` (SRTP
    and header extensions at that batch's edges, as for G.711)."""

    def __init__(
        self,
        table: LegTable,
        jitter: JitterBank,
        streams: StreamBank,
        sender: BatchSender,
        srtp_edges: SrtpEdges,
        extensions: ExtensionEdges,
        rate: int,
        frame: int,
        codec_frame: int,
    ) -> None:
        self.table = table
        self.jitter = jitter
        self.streams = streams
        self.sender = sender
        self.srtp_edges = srtp_edges
        self.extensions = extensions
        self.rate = rate
        self.frame = frame
        self.codec_frame = codec_frame
        self.packet = CLOCK * codec_frame // 8000  # RTP time of one packet (960 at 20 ms)
        self.silence = silence(codec_frame // 8)
        self.rest_packets = max(1, REST_MS * 8 // codec_frame)  # 20 at 20 ms, 40 at 10 ms

    @staticmethod
    def columns() -> tuple[Column, ...]:
        return (
            ("opus_codec", (), object, None),  # an Opus leg's OpusLeg (the table's `opus` marks it)
            ("opus_time", (), np.int64, 0),  # the peer's RTP time, 48 kHz, unwrapped
            ("opus_started", (), bool, False),  # ... known (a packet came)
            ("opus_quiet", (), bool, True),  # our last frame went as silence (DTX)
            # The peer is silent and nothing waits: its SILENCE packets change nothing, so
            # an idle shared talkgroup costs no Python per packet or per tick here.
            ("opus_idle", (), bool, True),
            ("opus_rest", (), bool, False),  # its owner lets it send silence as DTX does
            ("opus_news", (), np.int64, 0),  # silent packets still sent every tick
            ("opus_since", (), np.int64, 0),  # ticks since its last packet went
        )

    def start(self, row: int, on: bool) -> None:
        """Make ``row`` an Opus leg (a new encoder and decoder) or a G.711 one."""
        t = self.table
        t.opus[row] = on
        t.opus_codec[row] = OpusLeg(self.rate, self.frame) if on else None
        t.opus_started[row] = False
        t.opus_quiet[row] = True
        t.opus_idle[row] = True
        self.jitter.whole[row] = on
        t.opus_news[row] = NEWS_PACKETS

    def may_rest(self, row: int, rest: bool) -> None:
        """Whether ``row`` may send its silence as DTX (module docstring); called when its
        owner's words change, so the next silent packets carry them at once.

        Its owner keeps it False while the header extension says someone is keyed: the
        peer takes a keyed talker whose packets stop for long as gone."""
        t = self.table
        t.opus_rest[row] = rest
        t.opus_news[row] = NEWS_PACKETS

    # --- receive --------------------------------------------------------------------------

    def packets(
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
        """One packet for each of ``rows`` (distinct Opus legs): checked, then receive
        statistics and the jitter bank with their RTP time in 8 kHz units."""
        good, ts8 = self._arrivals(rows, ts, data, idx, size)
        rows, ssrc, seq, arrival, marker, idx, size = (
            a[good] for a in (rows, ssrc, seq, arrival, marker, idx, size)
        )
        if rows.size == 0:
            return
        changed = self.streams.update(rows, ssrc, seq, ts8, arrival)
        if changed.size:
            self.jitter.resync(changed)
            for row in changed.tolist():
                self.table.opus_codec[row].reset()
            self.table.opus_idle[changed] = True
        self._put(rows, ts8, arrival, marker, data, idx, size)

    def _arrivals(
        self, rows: np.ndarray, ts: np.ndarray, data: np.ndarray, idx: np.ndarray, size: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """For the Opus packets of a round (rows distinct): which are Opus packets of a frame
        (the others are counted ``opus``) and their RTP time in 8 kHz units."""
        t = self.table
        good = size == 1  # the peer's silence (DTX): nothing to check
        for i in np.flatnonzero(~good).tolist():
            payload = bytes(data[idx[i], HEADER_SIZE : HEADER_SIZE + size[i]])
            good[i] = packet_samples(payload) == self.packet
        if not good.all():
            t.count("opus", rows[~good], int((~good).sum()))
        rows, ts = rows[good], ts[good]
        last = t.opus_time[rows]
        step = ((ts - last + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        extended = np.where(t.opus_started[rows], last + step, ts)
        t.opus_time[rows] = np.where(t.opus_started[rows], np.maximum(last, extended), extended)
        t.opus_started[rows] = True
        return good, (extended // (CLOCK // 8000)) & 0xFFFFFFFF

    def _put(
        self,
        rows: np.ndarray,
        ts8: np.ndarray,
        arrival: np.ndarray,
        marker: np.ndarray,
        data: np.ndarray,
        idx: np.ndarray,
        size: np.ndarray,
    ) -> None:
        """Time the packets in the jitter bank (a placeholder in its ring); hold the kept."""
        holder = np.full((len(rows), self.codec_frame), _PLACEHOLDER, np.uint8)
        kept = self.jitter.put_batch(rows, ts8, holder, arrival, marker)
        idle = self.table.opus_idle
        kept &= (size > 1) | ~idle[rows]  # silence to a leg at rest: nothing to do
        idle[rows[kept]] = False
        for row, slot, j, n in zip(
            rows[kept].tolist(),
            ts8[kept].tolist(),
            idx[kept].tolist(),
            size[kept].tolist(),
            strict=True,
        ):
            payload = self.silence if n == 1 else bytes(data[j, HEADER_SIZE : HEADER_SIZE + n])
            self.table.opus_codec[row].hold(slot, payload)

    def playout(
        self, rows: np.ndarray, concealed_before: np.ndarray, now: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """After the jitter bank played: each Opus row's frame at the engine rate and level.

        ``concealed_before``: the rows' concealed count before the jitter bank played
        (it counted a placeholder's gap; only what libopus really made up counts)."""
        t = self.table
        jitter = self.jitter
        frames = np.zeros((len(rows), self.frame), np.float32)
        slot = (jitter.play[rows] - jitter.frame) & 0xFFFFFFFF  # the slot just played
        recent = (now - jitter.last_arrival[rows]) < 10 * jitter.frame
        concealed = concealed_before.copy()
        for i in np.flatnonzero(jitter.started[rows] & ~t.opus_idle[rows]).tolist():
            row = int(rows[i])
            leg: OpusLeg = t.opus_codec[row]
            pcm, what = leg.play(int(slot[i]), jitter.frame, bool(recent[i]))
            t.opus_idle[row] = leg.quiet_in and not leg.waiting
            if pcm is not None:
                frames[i] = pcm
            if what in ("plc", "bad"):
                concealed[i] += jitter.frame
            if what == "bad":
                t.count("opus", np.array([row]))
        jitter.concealed[rows] = concealed
        rms = np.sqrt(np.einsum("ij,ij->i", frames, frames) / self.frame)
        level = np.where(rms > 0, 20.0 * np.log10(np.maximum(rms, 1e-6)), SILENCE_DB)
        return frames, level

    def fec_recovered(self, row: int) -> int:
        codec = self.table.opus_codec[row]
        return 0 if codec is None else codec.fec_recovered

    # --- send -----------------------------------------------------------------------------

    def send(self, rows: np.ndarray) -> None:
        """Encode each Opus leg's frame and send all their packets in one ``sendmmsg``.

        Packets are built (header, talker extension, SRTP) only for the legs that send
        this tick: most idle legs rest (:data:`REST_MS`), and at 10 ms frames building
        and then dropping their packets every tick was a fixed cost 100 times a second."""
        t = self.table
        has = t.tx_has[rows] & ~t.muted[rows]
        t.tx_has[rows] = False
        loud = np.zeros(len(rows), bool)  # the rest go as SILENCE, no encoder called
        heard = np.flatnonzero(has)
        if heard.size:
            loud[heard] = t.tx[rows[heard]].any(axis=1)
        payloads: dict[int, bytes] = {}
        for i in np.flatnonzero(loud).tolist():
            payloads[i] = t.opus_codec[rows[i]].encode(t.tx[rows[i]])
        if len(payloads) < len(rows):
            pause = rows[~loud & ~t.opus_quiet[rows]]
            for row in pause.tolist():  # a pause begins
                t.opus_codec[row].quiet_out = True
            t.opus_news[pause] = NEWS_PACKETS
        t.opus_quiet[rows] = ~loud
        due = self._due(rows, loud)
        dest = t.dest[rows]
        going = np.flatnonzero((dest != NO_PEER) & t.sending[rows] & due)
        if going.size:
            self._send(rows[going], dest[going], [payloads.get(i) for i in going.tolist()])
        t.tx_ts[rows] = (t.tx_ts[rows] + self.packet) & 0xFFFFFFFF

    def _send(self, rows: np.ndarray, dest: np.ndarray, payloads: list[bytes | None]) -> None:
        """The packets of the legs that send this tick (``None``: the silence)."""
        t = self.table
        count = len(rows)
        sizes = np.array([len(self.silence if p is None else p) for p in payloads]) + HEADER_SIZE
        block = int(t.ext_len[rows].max())  # the talker extension, put after the header
        width = int(sizes.max()) + block + (SRTP_TAG if t.srtp_legs else 0)
        packets = np.empty((count, width), np.uint8)
        lengths = write_packets(t, packets, payloads, self.silence, sizes - HEADER_SIZE, rows)
        if t.srtp_legs:
            lengths = self.srtp_edges.protect_batch(packets, rows, np.ones(count, bool), lengths)
            refused = lengths <= 0
            if refused.any():  # not sent, and its sequence number not used
                keep = ~refused
                rows, dest, packets = rows[keep], dest[keep], packets[keep]
                lengths, sizes = lengths[keep], sizes[keep]
        ok = self.sender.send(np.ascontiguousarray(packets), dest, lengths)
        for row in rows[~ok].tolist():
            media = t.media[row]
            if media is not None:
                media.send_errors += 1
        t.tx_seq[rows] = (t.tx_seq[rows] + 1) & 0xFFFF
        done = rows[ok]
        t.tx_first[done] = False
        t.packets_out[done] += 1
        t.bytes_out[done] += sizes[ok]
        t.payload_out[done] += sizes[ok] - HEADER_SIZE

    def _due(self, rows: np.ndarray, loud: np.ndarray) -> np.ndarray:
        """Which of ``rows`` send a packet this tick: all but a resting leg's silence
        between its packets (module docstring)."""
        t = self.table
        news = t.opus_news[rows]
        since = t.opus_since[rows]
        due = loud | ~t.opus_rest[rows] | (news > 0) | (since + 1 >= self.rest_packets)
        t.opus_since[rows] = np.where(due, 0, since + 1)
        t.opus_news[rows] = np.where(due & ~loud, np.maximum(news - 1, 0), news)
        return due
