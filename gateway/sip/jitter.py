"""Adaptive jitter buffers for all SIP legs at once, with packet-loss concealment.

Why one object for every leg: at hundreds of calls the per-leg Python work is
the budget to watch, so each leg is a *row* in shared arrays. A packet is
written into its row's ring (codec bytes addressed by RTP timestamp, so reordering
and duplicates need no bookkeeping); once per tick every leg's next frame is
gathered, decoded and concealed by one C loop over the rows (``_rtpbatch.playout``).

Packets arrive in batches (one ``recvmmsg`` per tick for every leg): a batch
whose rows are all different is put by one C loop too (``_rtpbatch.put``) —
timestamp unwrapping, lateness, the transit sample and the ring write — so no
Python runs per packet. As NumPy both were some sixty small steps a tick, each a
fixed cost whatever the number of calls: at 10 ms frames (#15), too many.

How the delay adapts: every packet's transit (arrival, on the local clock, minus
the time its last sample was captured, on the sender's clock) goes into a short
per-leg history (the last 64 packets, 1.3 s). **The rule**: each tick plays the
newest whole packets that would have arrived by the tick's ideal time with a transit
of the 4th slowest of that history (its 95th percentile) plus 2 ms; a packet slower
than that is late, dropped and concealed as if lost — as WebRTC's NetEq does, a few
stragglers in a second are not worth the delay it would take to wait for all of them
(the slowest of 64, the rule before, kept one late tick or WAN spike in every
packet's delay for 1.3 s). The 2 ms keep a clean link's own tick jitter (a
millisecond or two, where the percentile and the slowest differ) from making
packets late when they happen to arrive just as the tick falls. When jitter grows,
the playout point steps back at once (the gap is concealed); when it shrinks, it
creeps forward again (a few samples per frame while the caller talks, at once in
silence), so a burst leaves no lasting delay.
Times are in codec samples (8 kHz for G.711).

What a listener waits for beyond the network's own delay, then: the packet time
(a packet leaves when its 20 ms are captured), that percentile's excess over the
mean transit, and the wait for the next tick (0-20 ms: the two sides' ticks have no
common phase). Nothing else is held: an Opus row (``whole``) uses the next packet's
FEC only when it is already in hand (:mod:`gateway.sip.bank_opus`).
"""

from __future__ import annotations

import numpy as np

from gateway.sip import _rtpbatch
from gateway.sip.columns import Columns

RING = 4096  # codec samples per leg (512 ms at 8 kHz): the most a buffer can hold
HISTORY = 64  # transits remembered per leg (≈1.3 s at 20 ms packets)
TARGET_RANK = 4  # playout waits for the 4th slowest of HISTORY transits (p95); later: late
MARGIN = 16  # samples (2 ms) beyond it: a clean link's tick jitter never makes a packet late
CREEP_TALKING = 16  # samples the playout point may jump forward per frame mid-speech
# A row of whole packets (Opus: a packet cannot be cut) creeps forward mid-speech by
# skipping a packet at most once in this many (16 samples a frame is 1 in 10, too).
WHOLE_CREEP_EVERY = 10
FORWARD_HYSTERESIS = 24  # do not chase less excess delay than this (3 ms)
PLC_FADE = 0.6  # each further lost frame is repeated at this gain
LATE_RESYNC = 12  # this many late packets in a row: the sender's clock jumped, resync
# Each ring row carries a copy of its first TAIL samples after its end, so any block of
# up to TAIL samples starting anywhere in the ring is contiguous in memory: a frame is
# read as one run, wherever it starts.
TAIL = 320
# The playout's loop in C (_rtpbatch.playout) is handed these, and these columns, in order.
_CONSTANTS = (
    RING,
    TAIL,
    HISTORY,
    TARGET_RANK,
    MARGIN,
    CREEP_TALKING,
    WHOLE_CREEP_EVERY,
    FORWARD_HYSTERESIS,
    PLC_FADE,
)
# ... and the put's (_rtpbatch.put).
_PUT_COLUMNS = (
    "ring",
    "have",
    "play",
    "started",
    "fresh",
    "base",
    "transit",
    "count",
    "last_arrival",
    "packet",
    "align",
    "packets_late",
    "late_run",
)
_PLAYOUT_COLUMNS = (
    "ring",
    "have",
    "started",
    "transit",
    "base",
    "align",
    "packet",
    "fresh",
    "play",
    "whole",
    "count",
    "last_arrival",
    "fade",
    "concealed",
    "last_pos",
    "delay",
)


def dense(rows: np.ndarray) -> np.ndarray | slice:
    """``rows`` as a slice when they are 0..n-1 in order (the usual case: no call has ended
    out of order), so gathers and scatters become views instead of copies."""
    n = len(rows)
    if n and rows[0] == 0 and rows[n - 1] == n - 1:
        return slice(0, n)
    return rows


class JitterBank(Columns):
    """Rows of jitter buffers. Row management (which row is which leg) is the caller's."""

    COLUMNS = (
        ("ring", (RING + TAIL,), np.uint8, 0),
        ("have", (RING + TAIL,), bool, False),
        ("play", (), np.int64, 0),  # next sample to play, in extended RTP time
        ("transit", (HISTORY,), np.float64, 0.0),
        ("last_pos", (), np.int64, -1),  # row's place in the last tick's frames
        ("fade", (), np.float32, 1.0),
        ("delay", (), np.float64, 0.0),  # fastest arrival → playout, the tick's phase included
        ("concealed", (), np.int64, 0),
        ("started", (), bool, False),
        ("fresh", (), bool, False),  # started, not yet played: place the playout
        ("base", (), np.float64, 0.0),  # local units minus RTP time at sync
        ("count", (), np.int64, 0),  # transits recorded (position in the history)
        ("late_run", (), np.int64, 0),
        ("packet", (), np.int64, 160),  # samples per packet (ptime)
        ("align", (), np.int64, 0),  # where packets end, modulo their size
        ("last_arrival", (), np.float64, -1e18),
        ("packets_late", (), np.int64, 0),
        ("whole", (), bool, False),  # packets cannot be cut (Opus): play moves in whole ones
    )

    def __init__(self, capacity: int, frame: int, rate: int = 8000) -> None:
        self.frame = frame
        self._last = np.zeros((0, frame), np.float32)  # last tick's frames (rows at last_pos)
        self.rate = rate
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        super().grow(capacity)
        self._columns = tuple(getattr(self, name) for name in _PLAYOUT_COLUMNS)
        self._put_columns = tuple(getattr(self, name) for name in _PUT_COLUMNS)

    def resync(self, rows: int | np.ndarray) -> None:
        """New SSRC or a timestamp jump: take the next packet as the new reference."""
        self.started[rows] = False
        self.have[rows] = False

    # --- per packet batch ---------------------------------------------------------

    def put_batch(
        self,
        rows: np.ndarray,
        timestamps: np.ndarray,
        codes: np.ndarray,
        arrival: np.ndarray,
        marker: np.ndarray,
    ) -> np.ndarray:
        """Put one packet per row (rows all distinct, every payload ``codes.shape[1]`` long).

        Returns which were kept; a packet too late to be played is counted. A late
        packet with the marker bit is a talkspurt restarting the sender's clock:
        the row resyncs to it. So does one far ahead of the playout point. One C loop
        (``_rtpbatch.put``): the timestamp unwrapped by the playout point, the transit
        sample, lateness, and the codes into the ring (and its tail copy).
        """
        keep = np.empty(len(rows), bool)
        _rtpbatch.put(
            self._put_columns,
            np.ascontiguousarray(rows, np.int64),
            np.ascontiguousarray(timestamps, np.int64),
            np.ascontiguousarray(codes, np.uint8),
            np.ascontiguousarray(arrival, np.float64),
            np.ascontiguousarray(marker, bool),
            keep,
            self.frame,
            (RING, TAIL, HISTORY, LATE_RESYNC),
        )
        return keep

    # --- per tick, all rows -------------------------------------------------------------

    def playout(
        self, rows: np.ndarray, now: float, talking: np.ndarray, table: np.ndarray, law: np.ndarray
    ) -> np.ndarray:
        """This tick's decoded frame for each row in ``rows`` (float32, rows × frame).

        ``now`` is the tick's ideal time in codec samples; ``table`` is the
        (laws × 256) decode table and ``law`` each row's index into it (every row's).
        Rows that have never received audio give silence and are not counted as
        concealed. The rule (module docstring) runs per row in one C loop
        (``_rtpbatch.playout``): as NumPy it was some forty steps, each a fixed cost per
        tick whatever the number of rows — at 10 ms frames a tenth of a gateway's time.
        The frames returned are what concealment repeats next tick: the caller must
        not write into them."""
        out = np.empty((len(rows), self.frame), np.float32)
        played = _rtpbatch.playout(
            self._columns,
            np.ascontiguousarray(rows, np.int64),
            np.ascontiguousarray(talking, bool),
            table,
            law,
            self._last,
            out,
            float(now),
            self.frame,
            _CONSTANTS,
        )
        if played:
            self._last = out
        return out
