"""The leg table: one row per SIP call, every column the leg bank's parts share.

The leg bank (:mod:`gateway.sip.bank`) owns one :class:`LegTable` and hands it to its
parts (receive, send, RTCP, SRTP, header extensions, Opus), which read and write
the rows as NumPy columns. Besides the columns, the table keeps what every part
asks of a row: its :class:`~gateway.sip.legmedia.LegMedia`, which rows are in use,
the dropped-packet counters, and the sorted (address, SSRC) index that finds the row
a packet belongs to (one ``searchsorted`` for a whole batch).
"""

from __future__ import annotations

import numpy as np

from gateway.sip import _rtpbatch
from gateway.sip.columns import Column, Columns
from gateway.sip.legmedia import LegMedia
from gateway.sip.streams import NO_SSRC

CODEC_RATE = 8000
HEADER_SIZE = 12
SILENCE_DB = -120.0
NO_PEER = -1  # address key of a leg whose peer address is not known
SSRC_HANDOVER = 1.0  # seconds a locked SSRC must be silent before another one replaces it
UNKNOWN, ADDRESS_ONLY, ANY_SSRC, EXACT = -1, 0, 1, 2  # how LegTable.lookup matched a packet

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

# Per leg, what the parts share and the index reads (each part adds its own columns).
ROW_COLUMNS = (
    ("payload_type", (), np.int64, -1),  # the agreed codec: checked on receive, sent
    ("law", (), np.int64, 0),  # its row in DECODE/ENCODE
    ("opus", (), bool, False),  # the codec is Opus: coded per leg (bank_opus)
    ("dest", (), np.int64, NO_PEER),  # the peer's address key: where we send, whom we hear
    ("latched", (), bool, False),  # the peer has sent: `dest` is where it sends from
    ("srtp", (), bool, False),  # SRTP agreed: packets protected and checked (bank_srtp)
    ("srtp_rx", (), np.int64, 0),  # ... its libsrtp contexts' addresses: the peer's key,
    ("srtp_tx", (), np.int64, 0),  # and ours (owned by LegMedia.srtp; 0 when the row goes)
    ("group", (), np.int64, -1),  # the (route, talkgroup) the call came in on: route_stats()
    ("rx_ssrc", (), np.int64, NO_SSRC),  # the SSRC the call hears (locked on its first packet)
    ("sending", (), bool, False),  # RTP may go out (an answered call: after the ACK)
    ("rtp_at", (), np.float64, 0.0),  # wall time the peer's RTP was last accepted
    ("rtcp_at", (), np.float64, 0.0),  # ... and its RTCP
)


class LegTable(Columns):
    """Rows of SIP legs: :data:`ROW_COLUMNS` and the parts' ``columns`` as attributes,
    and the rows' media."""

    def __init__(self, columns: tuple[Column, ...], capacity: int) -> None:
        self.COLUMNS = (*ROW_COLUMNS, *columns)  # this table's: sizes depend on the frame
        self.media: list[LegMedia | None] = []
        self.free: list[int] = []
        self.active = np.zeros(0, np.int64)  # rows in use, ascending
        self.srtp_legs = 0  # legs with SRTP (the SRTP part runs only when there are some)
        self.opus_legs = 0  # legs with Opus (the Opus part runs only when there are some)
        self.now = 0.0  # wall time of this tick's receive step
        self.ticks = 0  # ticks since the bank started (RTCP reports are spread over them)
        self.malformed = dict.fromkeys(MALFORMED_KINDS, 0)
        self._addresses = np.zeros(0, np.int64)  # distinct peer address keys, sorted
        self._keys = np.zeros(0, np.int64)  # (address rank, SSRC + 1) keys, sorted (0: any)
        self._key_rows = np.zeros(0, np.int64)  # ... and their rows
        self._sole = np.zeros(0, np.int64)  # per address: its one unannounced row, else -1
        self.grow(capacity)

    # --- dropped packets --------------------------------------------------------------

    def count(self, kind: str, rows: np.ndarray | None = None, amount: int = 1) -> None:
        """``amount`` packets dropped as ``kind``; ``rows``: the legs they came from."""
        self.malformed[kind] += amount
        if rows is not None:
            for row in rows.tolist():
                media = self.media[row]
                if media is not None:
                    media.malformed += 1

    def drop(self, kind: str, row: int) -> None:
        """One packet dropped as ``kind``, from leg ``row`` (or from nobody's address: -1)."""
        self.count(kind, np.array([row]) if row >= 0 else None)

    # --- which row a packet belongs to ------------------------------------------------

    def update(self) -> None:
        """Rows in use, and the sorted (address, SSRC) index, after a leg came, went,
        latched, locked its SSRC or moved.

        Each row is one key per SSRC its peer announced, else one key for its locked
        SSRC, else one key that takes any SSRC (0). An address is stored as its rank
        among the distinct addresses, so (rank, SSRC + 1) fits one int64 and one
        ``searchsorted`` finds a whole batch's rows."""
        self.active = np.array([i for i, m in enumerate(self.media) if m is not None], np.int64)
        self.srtp_legs = int(self.srtp[self.active].sum())
        self.opus_legs = int(self.opus[self.active].sum())
        rows = self.active[self.dest[self.active] != NO_PEER]
        addresses = self.dest[rows]
        ssrcs = self.rx_ssrc[rows] + 1  # NO_SSRC (-1) becomes 0: any SSRC
        announced = [i for i, row in enumerate(rows.tolist()) if self.media[row].announced]
        if announced:
            extra_rows, extra_ssrcs = [], []
            for i in announced:
                for ssrc in self.media[rows[i]].announced:
                    extra_rows.append(rows[i])
                    extra_ssrcs.append(ssrc + 1)
            keep = np.ones(len(rows), bool)
            keep[announced] = False
            rows = np.concatenate([rows[keep], np.array(extra_rows, np.int64)])
            ssrcs = np.concatenate([ssrcs[keep], np.array(extra_ssrcs, np.int64)])
            addresses = self.dest[rows]
        self._addresses = np.unique(addresses)
        rank = np.searchsorted(self._addresses, addresses)
        keys = (rank << 33) | ssrcs
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._key_rows = rows[order]
        # The one row at an address whose SSRC may be handed over (no announcement, alone).
        self._sole = np.full(len(self._addresses), -1, np.int64)
        counts = np.bincount(rank, minlength=len(self._addresses))
        for r in np.flatnonzero(counts == 1).tolist():
            row = int(rows[rank == r][0])
            if not self.media[row].announced:
                self._sole[r] = row

    def lookup(self, source: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The row each received packet belongs to by (source address key, SSRC): one C
        loop over the batch (``_rtpbatch.lookup``), a binary search of the index each.

        ``data``: the packets, one per row (the SSRC is read from its header: RTCP's
        sender's at byte 4). Returns (rows, match): ``match`` is EXACT (address and SSRC),
        ANY_SSRC (a row not locked yet; ``rows`` is it), ADDRESS_ONLY (a known address
        with another SSRC; ``rows`` is the row that may take it over under RFC 3550, else
        -1) or UNKNOWN."""
        n = len(source)
        rows = np.empty(n, np.int64)
        match = np.empty(n, np.int64)
        _rtpbatch.lookup(
            data,
            data.shape[1],
            np.ascontiguousarray(source, np.int64),
            self._addresses,
            self._keys,
            self._key_rows,
            self._sole,
            rows,
            match,
        )
        return rows, match

    def rows_at(self, key: int) -> list[int]:
        """Every row whose peer's RTP address is ``key``."""
        rank = int(np.searchsorted(self._addresses, key))
        if rank >= self._addresses.size or self._addresses[rank] != key:
            return []
        lo, hi = np.searchsorted(self._keys, [rank << 33, (rank + 1) << 33])
        return sorted(set(self._key_rows[lo:hi].tolist()))

    def lock(self, row: int, ssrc: int) -> None:
        """The call hears only ``ssrc`` from now on (its first packet's, or a handover)."""
        self.rx_ssrc[row] = ssrc
        self.update()

    def may_hand_over(self, row: int) -> bool:
        """RFC 3550 §6.3.5/§8.2: the locked SSRC stopped (silent SSRC_HANDOVER), so the
        new one from the same address is the peer's new stream, not an injection."""
        media = self.media[row]
        return (
            media is not None
            and not media.announced
            and self.now - float(self.rtp_at[row]) >= SSRC_HANDOVER
        )

    def waiting_rows(self) -> np.ndarray:
        """Legs whose phone has not sent yet: a packet from another port of its host may
        be its own, from behind NAT."""
        n = len(self.media)
        return np.flatnonzero((self.dest[:n] != NO_PEER) & ~self.latched[:n])


def write_packets(
    t: LegTable,
    packets: np.ndarray,
    payloads: list | None,
    silence: bytes | None,
    payload_sizes: np.ndarray,
    rows: np.ndarray,
) -> np.ndarray:
    """The next RTP packet of each of ``rows`` into a row of ``packets`` (one C call,
    ``_rtpbatch.build``): its header from the send columns, its talker block, then its
    payload (``payloads[i]``, or ``silence``; None: already in place after the header).
    Returns each packet's length."""
    lengths = np.empty(len(rows), np.int64)
    _rtpbatch.build(
        packets,
        packets.shape[1],
        payloads,
        silence,
        payload_sizes,
        rows,
        t.payload_type,
        t.tx_first,
        t.tx_seq,
        t.tx_ts,
        t.tx_ssrc,
        t.ext_len,
        t.ext_block,
        lengths,
    )
    return lengths
