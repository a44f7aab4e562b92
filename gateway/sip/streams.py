"""Receive bookkeeping of every leg's RTP stream at once: sequence extension, loss, jitter.

The arithmetic is RFC 3550 A.1 and A.8, the same as :class:`gateway.sip.rtp.ReceiveStats`
(which stays as the one-stream reference), done on columns: one call accounts a
batch of packets whose rows are all different, so a tick with one packet per leg
is one pass of NumPy whatever the number of legs. A new SSRC restarts the
sequence bookkeeping of its row; loss counted on the old SSRC is kept.
"""

from __future__ import annotations

import numpy as np

from gateway.sip.columns import Columns

NO_SSRC = -1


class StreamBank(Columns):
    """Per-row receive state; rows are managed by the caller (the leg bank)."""

    COLUMNS = (
        ("ssrc", (), np.int64, NO_SSRC),
        ("base_seq", (), np.int64, 0),
        ("max_seq", (), np.int64, 0),
        ("cycles", (), np.int64, 0),
        ("received", (), np.int64, 0),
        ("lost_before", (), np.int64, 0),
        ("jitter", (), np.float64, 0.0),
        ("transit", (), np.float64, np.nan),
        # RTCP: what the last report covered (for "fraction lost" since then)
        ("expected_prior", (), np.int64, 0),
        ("received_prior", (), np.int64, 0),
    )

    def __init__(self, capacity: int) -> None:
        self.grow(capacity)

    def update(
        self,
        rows: np.ndarray,
        ssrc: np.ndarray,
        seq: np.ndarray,
        timestamp: np.ndarray,
        arrival: np.ndarray,
    ) -> np.ndarray:
        """Account one packet for each of ``rows`` (all distinct); the rows whose SSRC changed.

        ``arrival`` is local time in timestamp units (codec samples).
        """
        changed = ssrc != self.ssrc[rows]
        if changed.any():
            c = rows[changed]
            had = self.ssrc[c] != NO_SSRC
            self.lost_before[c] += np.where(had, self.lost_of(c), 0)
            self.ssrc[c] = ssrc[changed]
            self.base_seq[c] = self.max_seq[c] = seq[changed]
            self.cycles[c] = self.received[c] = 0
            self.expected_prior[c] = self.received_prior[c] = 0
            self.jitter[c] = 0.0
            self.transit[c] = np.nan
        same = ~changed
        max_seq = self.max_seq[rows]
        delta = (seq - max_seq) & 0xFFFF
        forward = same & (delta < 0x8000)
        self.cycles[rows] += np.where(forward & (seq < max_seq), 0x10000, 0)
        self.max_seq[rows] = np.where(forward, seq, max_seq)
        self.received[rows] += 1
        transit = arrival - timestamp
        before = self.transit[rows]
        d = np.abs(transit - before)
        ok = ~np.isnan(before) & (d < 1 << 30)  # a timestamp jump (new talkspurt) is not jitter
        if ok.any():
            jitter = self.jitter[rows]
            self.jitter[rows] = np.where(ok, jitter + (d - jitter) / 16.0, jitter)
        self.transit[rows] = transit
        return rows[changed]

    def expected_of(self, rows: np.ndarray | int) -> np.ndarray:
        live = self.ssrc[rows] != NO_SSRC
        return np.where(live, self.cycles[rows] + self.max_seq[rows] - self.base_seq[rows] + 1, 0)

    def lost_of(self, rows: np.ndarray | int) -> np.ndarray:
        return np.maximum(0, self.expected_of(rows) - self.received[rows])

    def extended_max(self, row: int) -> int:
        return int(self.cycles[row] + self.max_seq[row])
