"""The leg bank's RTP header extension (RFC 8285): one block per leg, at the batch edges.

A cross-border link says on every packet who is talking on its side (keyed,
priority, emergency, talker ID and label: :mod:`gateway.links.talker`). The bank
does not read those words; it only moves the block, so a leg's owner decides what
it means:

* send: a leg whose owner set a block (:meth:`ExtensionEdges.set_extension`) has it
  put between the RTP header and the payload of each packet it sends, X bit set, as
  the send batch builds its packets (``_rtpbatch.build``, from the ``ext_len`` and
  ``ext_block`` columns); the other legs' packets have none;
* receive: from a leg whose owner asked for them (:meth:`ExtensionEdges.hear_extensions`),
  each packet's block is taken out of the packet in place (by the receive path's
  ``_rtpbatch.classify``), so the packet goes the common path (jitter buffer, decode)
  like any other, and a block is handed to the owner (``LegMedia.on_extension``) when
  it differs from the last one handed over. A talker's block is the same on every
  packet of an over, so the batch compares them all with the rows' last blocks in one
  C loop (:meth:`ExtensionEdges.news`) and the owner's Python runs once per change,
  not 50 times a second per leg. An owner that wants the next block
  even if it is the same (it rejected the last, or stopped believing it) says so
  with :meth:`ExtensionEdges.forget`. A block that runs into the payload or past the
  end leaves the packet to the one-packet parser, which drops and counts it (``layout``).
"""

from __future__ import annotations

import numpy as np

from gateway.sip import _rtpbatch
from gateway.sip.columns import Column
from gateway.sip.legtable import LegTable

MAX_EXTENSION = 80  # bytes of header extension we send (a talker block is at most 76);
# _rtpbatch.c keeps the last received block of each leg in as many (its MAX_EXTENSION)
_HEADER = 12


class ExtensionEdges:
    """Part of :class:`gateway.sip.bank.LegBank`: header extensions out and in (its columns:
    :meth:`columns`; the rows' ``media`` hear what came in)."""

    def __init__(self, table: LegTable) -> None:
        self.table = table

    @staticmethod
    def columns() -> tuple[Column, ...]:
        return (
            ("ext_len", (), np.int64, 0),  # bytes of header extension on each packet we send
            ("ext_block", (MAX_EXTENSION,), np.uint8, 0),  # ... and the bytes
            ("ext_in", (), bool, False),  # the leg's owner reads the peer's extensions
            ("ext_heard", (MAX_EXTENSION,), np.uint8, 0),  # the block last handed to it
            ("ext_heard_len", (), np.int64, 0),  # ... its length (0: hand over the next)
        )

    def set_extension(self, row: int, block: bytes) -> None:
        """The header extension block (profile, length, elements) on ``row``'s next packets;
        empty: none."""
        t = self.table
        if len(block) > MAX_EXTENSION or len(block) % 4:
            raise ValueError(f"a header extension block is 4-byte words up to {MAX_EXTENSION}")
        t.ext_block[row, : len(block)] = np.frombuffer(block, np.uint8)
        t.ext_len[row] = len(block)

    def hear_extensions(self, row: int) -> None:
        """Hand ``row``'s received header extensions to its ``LegMedia.on_extension``."""
        self.table.ext_in[row] = True

    def forget(self, row: int) -> None:
        """Hand ``row``'s next block to its owner even if it is the last one again."""
        self.table.ext_heard_len[row] = 0

    # --- receive --------------------------------------------------------------------------

    def news(
        self, data: np.ndarray, length: np.ndarray, rows: np.ndarray, match: np.ndarray
    ) -> np.ndarray:
        """Hand the owners the received batch's blocks that are news; each packet's block
        size, for the receive path to take out (0: none to take).

        One C loop (``_rtpbatch.ext_news``) finds the blocks — a plain header with the X
        bit, from a leg that hears extensions at its exact address and SSRC, with a
        payload after the block — and compares each with the block before it from the
        same leg (in this batch, else the last one handed over); the owners' Python runs
        for the news only, in arrival order."""
        t = self.table
        n = len(length)
        size = np.empty(n, np.int64)
        news = np.empty(n, bool)
        count = _rtpbatch.ext_news(
            data,
            data.shape[1],
            length,
            rows,
            match,
            t.ext_in,
            t.ext_heard,
            t.ext_heard_len,
            size,
            news,
        )
        if count:
            for i in np.flatnonzero(news).tolist():
                media = t.media[int(rows[i])]
                if media is not None and media.on_extension is not None:
                    media.on_extension(bytes(data[i, _HEADER : _HEADER + int(size[i])]))
        return size

    def one(self, row: int, packet: bytes) -> None:
        """A packet off the common path (CSRCs, padding): its block to the owner, if any."""
        t = self.table
        media = t.media[row]
        if not (packet[0] & 0x10 and t.ext_in[row]) or media is None:
            return
        start = _HEADER + 4 * (packet[0] & 0x0F)
        if len(packet) < start + 4:
            return
        end = start + 4 + 4 * int.from_bytes(packet[start + 2 : start + 4], "big")
        if end <= len(packet) and media.on_extension is not None:
            media.on_extension(packet[start:end])
