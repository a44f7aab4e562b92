"""The leg bank's send path: what every leg hears, encoded and sent in one go after the tick.

The engine leaves each leg's frame in ``tx`` (silence where nothing is audible, and
for a leg still ``muted`` waiting for its PIN).
After the tick all legs are resampled to 8 kHz with one matrix product (each leg's
resampling history sits just before its frame in ``tx_ext``: no joining copy),
quantised and G.711-encoded with one table lookup, the RTP headers written as
columns, SRTP calls' packets protected in place (:mod:`gateway.sip.bank_srtp`), and
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
from gateway.sip.bank_rx import CODEC_RATE, HEADER_SIZE, NO_PEER
from gateway.sip.columns import Column
from gateway.sip.jitter import dense
from gateway.sip.legmedia import LegMedia
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
    """Mixin of :class:`gateway.sip.bank.LegBank`: the send half of every leg.

    Its per-leg columns are :meth:`_tx_columns`. Of the rest of the bank it uses the
    attributes declared below and, from the RTCP part, ``_send_reports()``."""

    # The bank's rows and addresses, and the parts it composes (see gateway.sip.bank).
    media: list[LegMedia | None]
    active: np.ndarray
    dest: np.ndarray
    sending: np.ndarray
    payload_type: np.ndarray
    law: np.ndarray
    frame: int
    codec_frame: int
    sock: socket.socket
    sender: BatchSender
    down: BlockResampler | None
    srtp_legs: int  # legs with SRTP: their packets are protected before the send (bank_srtp)
    opus_legs: int  # legs with Opus: encoded and sent apart (bank_opus)
    opus: np.ndarray  # column: the leg's codec is Opus
    # Columns of this path (filled by the bank from _tx_columns).
    tx_ext: np.ndarray
    tx: np.ndarray  # view: the frame part of tx_ext
    tx_has: np.ndarray
    muted: np.ndarray  # PIN not yet entered (a receive-path column): send silence
    busy: np.ndarray
    tx_seq: np.ndarray
    tx_ts: np.ndarray
    tx_ssrc: np.ndarray
    tx_first: np.ndarray
    packets_out: np.ndarray
    bytes_out: np.ndarray
    payload_out: np.ndarray

    def _tx_columns(self) -> tuple[Column, ...]:
        return (
            # What each leg hears, just after its resampling history (one buffer: no copy).
            ("tx_ext", (self._tx_history() + self.frame,), np.float32, 0.0),
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

    def _tx_history(self) -> int:
        return self.down.history_length if self.down else 0

    def _tx_view(self) -> None:
        """``tx``: the frame part of ``tx_ext`` (again after the columns grow)."""
        self.tx = self.tx_ext[:, self._tx_history() :]

    def _tx_start(self, row: int) -> None:
        """A new leg's stream: random sequence number, timestamp and SSRC (RFC 3550 §5.1)."""
        self.tx_seq[row] = random.getrandbits(16)
        self.tx_ts[row] = random.getrandbits(32)
        self.tx_ssrc[row] = random.getrandbits(32)

    # --- the tick ---------------------------------------------------------------------

    def _send(self) -> None:
        """After the tick: encode every leg's frame; headers as columns; one ``sendmmsg``."""
        rows = self.active
        if rows.size == 0:
            return
        if self.opus_legs:  # Opus legs: encoded one by one, sent in their own batch
            wide = self.opus[rows]
            if wide.any():
                self._send_opus(rows[wide])
                rows = rows[~wide]
                if rows.size == 0:
                    self._send_reports()
                    return
        sel = dense(rows)
        has = self.tx_has[sel] & ~self.muted[sel]  # a PIN not yet entered hears nothing
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
        packets = np.empty((count, size + (SRTP_TAG if self.srtp_legs else 0)), np.uint8)
        laws = self.law[sel]
        if (laws == laws[0]).all():
            packets[:, HEADER_SIZE:size] = ENCODE[laws[0]].take(pcm.view(np.uint16))
        else:
            packets[:, HEADER_SIZE:size] = ENCODE.reshape(-1).take(
                pcm.view(np.uint16).astype(np.int64) + (laws * 65536)[:, None]
            )
        self._headers(packets, sel)
        packets, sizes = self._attach_extensions(packets, sel, size)  # a link's talker
        dest = self.dest[sel]
        sending = self.sending[sel]
        busy = self.busy[sel] & sending
        audio = (dest != NO_PEER) & ~busy & sending
        lengths = sizes
        if self.srtp_legs:  # SRTP calls' packets protected in place (bank_srtp)
            lengths = self._protect_batch(packets, rows, audio, size if sizes is None else sizes)
            audio &= lengths > 0
        if audio.all():
            ok = self.sender.send(packets, dest, lengths)
            done, tried = rows[ok], rows
        else:
            pick = np.flatnonzero(audio)
            ok = self.sender.send(
                np.ascontiguousarray(packets[pick]),
                dest[pick],
                None if lengths is None else lengths[pick],
            )
            done, tried = rows[pick[ok]], rows[pick]
        if not ok.all():
            for row in rows[audio][~ok].tolist():
                media = self.media[row]
                if media is not None:
                    media.send_errors += 1
        for row in rows[busy].tolist():
            media = self.media[row]
            if media is not None and media.remote is not None:
                self._send_dtmf(row, media)
        # A packet the socket refused is lost on the way: its number is used (and SRTP
        # must never protect two packets under one number).
        self.tx_seq[tried] = (self.tx_seq[tried] + 1) & 0xFFFF
        self.tx_first[done] = False
        self.packets_out[done] += 1
        self.bytes_out[done] += size
        self.payload_out[done] += n
        self.tx_ts[rows] = (self.tx_ts[rows] + n) & 0xFFFFFFFF
        self._send_reports()

    def _headers(self, packets: np.ndarray, sel: slice | np.ndarray) -> None:
        """The RTP headers of one packet per row of ``sel``, written as columns."""
        count = len(packets)
        packets[:, 0] = 0x80
        packets[:, 1] = self.payload_type[sel] | (self.tx_first[sel].astype(np.uint8) << 7)
        packets[:, 2:4] = self.tx_seq[sel].astype(">u2").view(np.uint8).reshape(count, 2)
        packets[:, 4:8] = self.tx_ts[sel].astype(">u4").view(np.uint8).reshape(count, 4)
        packets[:, 8:12] = self.tx_ssrc[sel].astype(">u4").view(np.uint8).reshape(count, 4)

    # --- DTMF toward the phone (RFC 4733) ---------------------------------------------

    def queue_dtmf(self, row: int, digits: str) -> None:
        """RFC 4733 digits toward the phone; sent instead of audio on the next ticks."""
        media = self.media[row]
        if media is None:
            return
        media.dtmf_out.extend(d for d in digits if d in DTMF_DIGITS)
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
            packet = self._protect_one(row, header + build_event(digit, end, sent))
            self.tx_seq[row] = (seq + 1) & 0xFFFF  # used even if lost (see _send)
            try:
                if packet is None:
                    raise OSError("SRTP refused the packet")
                self.sock.sendto(packet, media.remote)
            except OSError:
                media.send_errors += 1
                continue
            self.packets_out[row] += 1
            self.bytes_out[row] += len(packet)
            self.payload_out[row] += len(packet) - HEADER_SIZE
        media.dtmf_sending = None if end else (digit, start, sent)
        self.busy[row] = bool(media.dtmf_out or media.dtmf_sending)
