"""The leg bank's SRTP: the two edges of the batch where packets are protected and checked.

Only legs whose call agreed SDES keys (:mod:`gateway.sip.srtp`) are touched; the
bank's per-leg ``srtp`` column marks them, and a bank without such legs runs
exactly as before. Receive: right after ``recvmmsg``, before any header column is
read, every packet from an SRTP leg's address is authenticated and decrypted in
place; one that fails is dropped and counted (``srtp_auth``, or ``srtp_replay`` for
a packet seen before) — it never reaches the jitter buffer, never latches a leg.
Send: right after the batch of RTP packets is built, before ``sendmmsg``, each SRTP
leg's packet is protected in place (the batch buffer has room for the tag).

A phone behind NAT latches only with an authenticated packet: a stray packet
from the host of exactly one waiting SRTP leg is checked with that leg's key
first, so nobody without the key can steer the leg's audio to themselves.
"""

from __future__ import annotations

import numpy as np

from gateway.sip.legtable import LegTable
from gateway.sip.srtp import REPLAY_FAIL, REPLAY_OLD, TAG, protect_rows, unprotect_rows

_RTCP_FIRST, _RTCP_LAST = 192, 223  # second octet of RTCP (RFC 5761 §4): in the clear in SRTCP


class SrtpEdges:
    """Part of :class:`gateway.sip.bank.LegBank`: protect and unprotect as batch edges.

    Reads the table's ``media``, ``dest``, ``srtp``/``srtp_rx``/``srtp_tx`` columns and
    its index (``lookup``, ``waiting_rows``); counts what it drops there."""

    def __init__(self, table: LegTable) -> None:
        self.table = table

    def unprotect_batch(
        self,
        data: np.ndarray,
        length: np.ndarray,
        truncated: np.ndarray,
        source: np.ndarray,
        rows: np.ndarray,
    ) -> np.ndarray | None:
        """Check and decrypt the SRTP packets of a received batch in place (``length`` too).

        ``rows``: each packet's leg by address and SSRC (``LegTable.lookup``, -1: none),
        the receive path's one search of the batch — the SSRC (RTP's, or RTCP's sender)
        is in the clear, so the key's owner is the leg the packet is demultiplexed to.
        Returns the indexes of the packets to keep, or None when all are kept."""
        t = self.table
        stray = rows < 0
        if stray.any():
            rows = rows.copy()
            rows[stray] = self._candidates(source[stray], data[stray, 1])
        secure = rows >= 0
        secure[secure] = t.srtp[rows[secure]]
        secure &= ~truncated & (length <= data.shape[1])  # the too-big are dropped after
        if not secure.any():
            return None
        idx = np.flatnonzero(secure)
        owners = rows[idx]
        b1 = data[idx, 1]
        rtcp = (b1 >= _RTCP_FIRST) & (b1 <= _RTCP_LAST)  # multiplexed on the RTP port
        status = unprotect_rows(data, idx, t.srtp_rx[owners], length, rtcp)
        bad = status != 0
        if not bad.any():
            return None
        replay = (status == REPLAY_FAIL) | (status == REPLAY_OLD)
        for kind, mask in (("srtp_replay", bad & replay), ("srtp_auth", bad & ~replay)):
            if mask.any():
                t.count(kind, owners[mask], int(mask.sum()))
        keep = np.ones(len(length), bool)
        keep[idx[bad]] = False
        return np.flatnonzero(keep)

    def _candidates(self, source: np.ndarray, b1: np.ndarray) -> np.ndarray:
        """For packets from nobody's address: the waiting SRTP leg each may belong to (-1:
        none) — the only waiting leg on the sender's host, as the NAT latch will pick."""
        t = self.table
        waiting = t.waiting_rows()
        found = np.full(len(source), -1, np.int64)
        if waiting.size == 0:
            return found
        hosts, first, counts = np.unique(
            t.dest[waiting] >> 16, return_index=True, return_counts=True
        )
        alone = counts == 1
        hosts, owner = hosts[alone], waiting[first[alone]]
        if hosts.size == 0:
            return found
        at = np.minimum(np.searchsorted(hosts, source >> 16), hosts.size - 1)
        match = (hosts[at] == source >> 16) & ((b1 < _RTCP_FIRST) | (b1 > _RTCP_LAST))
        found[match] = owner[at[match]]
        found[found >= 0] = np.where(t.srtp[found[found >= 0]], found[found >= 0], -1)
        return found

    def protect_batch(
        self, packets: np.ndarray, rows: np.ndarray, going: np.ndarray, size: int | np.ndarray
    ) -> np.ndarray:
        """Protect in place the packets of ``rows`` (``going`` out) that are SRTP legs'.

        ``size``: the plain packets' length (one for all, or per row); ``packets`` has
        ``TAG`` spare bytes after it. Returns every row's length on the wire (0: libsrtp
        refused it, e.g. a key at the end of its life: not sent)."""
        t = self.table
        lengths = np.zeros(len(rows), np.int64)
        lengths[:] = size
        which = np.flatnonzero(going & t.srtp[rows])
        if which.size:
            assert packets.shape[1] >= int(lengths.max()) + TAG
            lengths[which] = protect_rows(packets, which, t.srtp_tx[rows[which]], lengths[which])
        return lengths

    def protect_one(self, row: int, packet: bytes, rtcp: bool = False) -> bytes | None:
        """A packet sent off the batch (DTMF event, RTCP report), protected if the leg is SRTP."""
        media = self.table.media[row]
        if media is None or media.srtp is None:
            return packet
        return media.srtp.protect(packet, rtcp)
