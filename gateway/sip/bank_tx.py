"""The leg bank's send path: what every leg hears, encoded and sent in one go after the tick.

The engine leaves each leg's frame in ``tx`` (silence where nothing is audible, and
for a leg still ``muted`` waiting for its PIN).
After the tick all legs are resampled to 8 kHz with one matrix product (each leg's
resampling history sits just before its frame in ``tx_ext``: no joining copy),
quantised and G.711-encoded with one table lookup, the RTP headers (and a link's
talker extension) written by one C loop (``_rtpbatch.build``), SRTP calls' packets
protected in place (:mod:`gateway.sip.bank_srtp`), and
``sendmmsg`` sends every leg's packet in one system call, to the address the phone
sends from once it has sent (symmetric RTP). A row that may
not send yet (an answered call before its ACK: the SDP's address is a stranger's
word until the dialog is confirmed, and a never-confirmed call must not reflect
traffic at it) is encoded with the rest and not sent.

A leg sending RFC 4733 DTMF toward its phone sends event packets instead of audio
for those ticks, one at a time (rare). RTCP sender reports go out at the end of the
same step (:mod:`gateway.sip.bank_rtcp`).
"""

from __future__ import annotations

import random
import socket

import numpy as np

from gateway.codecs.g711 import alaw_encode, ulaw_encode
from gateway.sip.bank_ext import ExtensionEdges
from gateway.sip.bank_opus import OpusEdges
from gateway.sip.bank_rtcp import RtcpReports
from gateway.sip.bank_srtp import SrtpEdges
from gateway.sip.columns import Column
from gateway.sip.jitter import dense
from gateway.sip.legmedia import LegMedia
from gateway.sip.legtable import CODEC_RATE, HEADER_SIZE, NO_PEER, LegTable, write_packets
from gateway.sip.mmsg import BatchSender
from gateway.sip.resample import BlockResampler
from gateway.sip.rtp import build_event, build_header
from gateway.sip.srtp import TAG as SRTP_TAG

DTMF_SEND_SECONDS = 0.1
DTMF_DIGITS = "0123456789*#ABCD"

# 16-bit sample (as uint16) → µ-law (row 0) and A-law (row 1) code: encoding is one gather.
_PCM = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16)
ENCODE = np.stack([ulaw_encode(_PCM), alaw_encode(_PCM)])


class SendPath:
    """Part of :class:`gateway.sip.bank.LegBank`: the send half of every leg.

    Its columns are :meth:`columns`; at the batch's edges it hands the Opus legs to
    ``opus_edges``, puts in header extensions (``extensions``), protects SRTP legs'
    packets (``srtp_edges``), and after the RTP lets ``rtcp`` send the reports due."""

    def __init__(
        self,
        table: LegTable,
        sock: socket.socket,
        sender: BatchSender,
        down: BlockResampler | None,
        srtp_edges: SrtpEdges,
        extensions: ExtensionEdges,
        opus_edges: OpusEdges,
        rtcp: RtcpReports,
        codec_frame: int,
    ) -> None:
        self.table = table
        self.sock = sock
        self.sender = sender
        self.down = down
        self.srtp_edges = srtp_edges
        self.extensions = extensions
        self.opus_edges = opus_edges
        self.rtcp = rtcp
        self.codec_frame = codec_frame
        self.view()

    @staticmethod
    def columns(frame: int, down: BlockResampler | None) -> tuple[Column, ...]:
        history = down.history_length if down else 0
        return (
            # What each leg hears, just after its resampling history (one buffer: no copy).
            ("tx_ext", (history + frame,), np.float32, 0.0),
            ("tx_has", (), bool, False),  # the engine left a frame this tick
            ("busy", (), bool, False),  # sending RFC 4733 events instead of audio
            # RTP header fields and counters, updated in batches.
            ("tx_seq", (), np.int64, 0),
            ("tx_ts", (), np.int64, 0),
            ("tx_ssrc", (), np.int64, 0),
            ("tx_first", (), bool, True),  # marker bit on the first packet
            ("packets_out", (), np.int64, 0),
            ("bytes_out", (), np.int64, 0),
            ("payload_out", (), np.int64, 0),  # octets of payload (RTCP SR)
        )

    def view(self) -> None:
        """The table's ``tx``: the frame part of ``tx_ext`` (again after the table grows)."""
        t = self.table
        history = self.down.history_length if self.down else 0
        t.tx = t.tx_ext[:, history:]

    def start(self, row: int) -> None:
        """A new leg's stream: random sequence number, timestamp and SSRC (RFC 3550 §5.1)."""
        t = self.table
        t.tx_seq[row] = random.getrandbits(16)
        t.tx_ts[row] = random.getrandbits(32)
        t.tx_ssrc[row] = random.getrandbits(32)

    # --- the tick ---------------------------------------------------------------------

    def send(self) -> None:
        """After the tick: encode every leg's frame; headers in one C loop; one ``sendmmsg``."""
        t = self.table
        rows = t.active
        if rows.size == 0:
            return
        if t.opus_legs:  # Opus legs: encoded one by one, sent in their own batch
            wide = t.opus[rows]
            if wide.any():
                self.opus_edges.send(rows[wide])
                rows = rows[~wide]
                if rows.size == 0:
                    self.rtcp.send_reports()
                    return
        sel = dense(rows)
        has = t.tx_has[sel] & ~t.muted[sel]  # a PIN not yet entered hears nothing
        if not has.all():  # no audio for these: silence (and silence in their history)
            t.tx[rows[~has]] = 0.0
        t.tx_has[sel] = False
        if self.down is not None:
            ext = t.tx_ext[sel]  # a view when the rows are dense
            frames = self.down.process_ext(ext)
            h = self.down.history_length
            if isinstance(sel, slice):
                t.tx_ext[sel, :h] = t.tx_ext[sel, -h:]
            else:
                t.tx_ext[rows, :h] = ext[:, -h:]
        else:
            frames = t.tx[sel]
        # To 16-bit (truncating: G.711's coarsest step hides the half-LSB) in place.
        scaled = np.multiply(frames, np.float32(32768.0), dtype=np.float32)
        pcm = np.clip(scaled, -32768, 32767, out=scaled).astype(np.int16)
        n = self.codec_frame
        count = len(rows)
        size = HEADER_SIZE + n
        block = int(t.ext_len[sel].max())  # a link's talker extension, put after the header
        width = size + block + (SRTP_TAG if t.srtp_legs else 0)
        packets = np.empty((count, width), np.uint8)
        laws = t.law[sel]
        if (laws == laws[0]).all():
            packets[:, HEADER_SIZE:size] = ENCODE[laws[0]].take(pcm.view(np.uint16))
        else:
            packets[:, HEADER_SIZE:size] = ENCODE.reshape(-1).take(
                pcm.view(np.uint16).astype(np.int64) + (laws * 65536)[:, None]
            )
        lengths = write_packets(t, packets, None, None, np.full(count, n, np.int64), rows)
        dest = t.dest[sel]
        sending = t.sending[sel]
        busy = t.busy[sel] & sending
        audio = (dest != NO_PEER) & ~busy & sending
        if t.srtp_legs:  # SRTP calls' packets protected in place (bank_srtp)
            lengths = self.srtp_edges.protect_batch(packets, rows, audio, lengths)
            audio &= lengths > 0
        if audio.all():
            ok = self.sender.send(packets, dest, lengths)
            done, tried = rows[ok], rows
        else:
            pick = np.flatnonzero(audio)
            ok = self.sender.send(np.ascontiguousarray(packets[pick]), dest[pick], lengths[pick])
            done, tried = rows[pick[ok]], rows[pick]
        if not ok.all():
            for row in rows[audio][~ok].tolist():
                media = t.media[row]
                if media is not None:
                    media.send_errors += 1
        for row in rows[busy].tolist():
            media = t.media[row]
            if media is not None and media.remote is not None:
                self._send_dtmf(row, media)
        # A packet the socket refused is lost on the way: its number is used (and SRTP
        # must never protect two packets under one number).
        t.tx_seq[tried] = (t.tx_seq[tried] + 1) & 0xFFFF
        t.tx_first[done] = False
        t.packets_out[done] += 1
        t.bytes_out[done] += size
        t.payload_out[done] += n
        t.tx_ts[rows] = (t.tx_ts[rows] + n) & 0xFFFFFFFF
        self.rtcp.send_reports()

    # --- DTMF toward the phone (RFC 4733) ---------------------------------------------

    def queue_dtmf(self, row: int, digits: str) -> None:
        """RFC 4733 digits toward the phone; sent instead of audio on the next ticks."""
        t = self.table
        media = t.media[row]
        if media is None:
            return
        media.dtmf_out.extend(d for d in digits if d in DTMF_DIGITS)
        t.busy[row] = bool(media.dtmf_out or media.dtmf_sending)

    def _send_dtmf(self, row: int, media: LegMedia) -> None:
        """RFC 4733 send: one event per digit, 100 ms, then three end packets."""
        t = self.table
        if media.dtmf_type is None or media.remote is None:
            media.dtmf_out.clear()
            media.dtmf_sending = None
            t.busy[row] = False
            return
        if media.dtmf_sending is None:
            media.dtmf_sending = (media.dtmf_out.pop(0), int(t.tx_ts[row]), 0)
        digit, start, sent = media.dtmf_sending
        sent += self.codec_frame
        end = sent >= DTMF_SEND_SECONDS * CODEC_RATE
        for _ in range(3 if end else 1):
            seq = int(t.tx_seq[row])
            header = build_header(
                media.dtmf_type, sent == self.codec_frame, seq, start, int(t.tx_ssrc[row])
            )
            packet = self.srtp_edges.protect_one(row, header + build_event(digit, end, sent))
            t.tx_seq[row] = (seq + 1) & 0xFFFF  # used even if lost (see _send)
            try:
                if packet is None:
                    raise OSError("SRTP refused the packet")
                self.sock.sendto(packet, media.remote)
            except OSError:
                media.send_errors += 1
                continue
            t.packets_out[row] += 1
            t.bytes_out[row] += len(packet)
            t.payload_out[row] += len(packet) - HEADER_SIZE
        media.dtmf_sending = None if end else (digit, start, sent)
        t.busy[row] = bool(media.dtmf_out or media.dtmf_sending)
