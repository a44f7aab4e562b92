"""Adaptive jitter buffers for all SIP legs at once, with packet-loss concealment.

Why one object for every leg: at hundreds of calls the per-leg Python work is
the budget to watch, so each leg is a *row* in shared arrays. A packet is
written into its row's ring (codec bytes addressed by RTP timestamp, so reordering
and duplicates need no bookkeeping); once per tick every leg's next frame is
gathered, decoded and concealed in a handful of NumPy calls.

How the delay adapts: every packet's transit (arrival, on the local clock, minus
the time its last sample was captured, on the sender's clock) goes into a short
per-leg history. The playout point is placed just behind the slowest recent
transit (plus a small margin), so a frame is only played once its packets have
arrived. When jitter grows, the playout point steps back at once (the gap is
concealed); when a burst has left the history, it creeps forward again (a few
samples per frame while the caller talks, at once in silence), so a burst
leaves no lasting delay. Times are in codec samples (8 kHz for G.711).
"""

from __future__ import annotations

import numpy as np

RING = 8192  # codec samples per leg (1 s at 8 kHz): the most a buffer can hold
HISTORY = 64  # transits remembered per leg (≈1.3 s at 20 ms packets)
MARGIN = 16  # samples (2 ms) kept in hand beyond the slowest recent packet
CREEP_TALKING = 16  # samples the playout point may jump forward per frame mid-speech
FORWARD_HYSTERESIS = 24  # do not chase less excess delay than this (3 ms)
PLC_FADE = 0.6  # each further lost frame is repeated at this gain
LATE_RESYNC = 12  # this many late packets in a row: the sender's clock jumped, resync


class JitterBank:
    """Rows of jitter buffers. Row management (which row is which leg) is the caller's."""

    def __init__(self, capacity: int, frame: int, rate: int = 8000) -> None:
        self.frame = frame
        self.rate = rate
        self._arange = np.arange(frame, dtype=np.int64)
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        old = self.__dict__.copy() if hasattr(self, "ring") else None
        self.capacity = capacity
        self.ring = np.zeros((capacity, RING), np.uint8)
        self.have = np.zeros((capacity, RING), bool)
        self.play = np.zeros(capacity, np.int64)  # next sample to play, extended RTP time
        self.base = np.zeros(capacity, np.float64)  # local units minus RTP time at sync
        self.transit = np.zeros((capacity, HISTORY), np.float64)
        self.count = np.zeros(capacity, np.int64)  # packets in the history (ring position)
        self.packet = np.full(capacity, 160, np.int64)  # samples per packet (ptime)
        self.align = np.zeros(capacity, np.int64)  # where packets end, modulo their size
        self.started = np.zeros(capacity, bool)  # has a timing reference
        self.fresh = np.zeros(capacity, bool)  # place the playout point on the next tick
        self.last_arrival = np.full(capacity, -1e18)
        self.late_run = np.zeros(capacity, np.int64)
        self.last_frame = np.zeros((capacity, self.frame), np.float32)
        self.fade = np.ones(capacity, np.float32)
        self.delay = np.zeros(capacity, np.float64)  # current buffer delay, samples
        self.packets_late = np.zeros(capacity, np.int64)
        self.concealed = np.zeros(capacity, np.int64)
        if old is not None:
            n = old["capacity"]
            for name in (
                "ring",
                "have",
                "play",
                "base",
                "transit",
                "count",
                "started",
                "fresh",
                "last_arrival",
                "late_run",
                "last_frame",
                "fade",
                "delay",
                "packets_late",
                "concealed",
            ):
                getattr(self, name)[:n] = old[name]

    def grow(self, capacity: int) -> None:
        if capacity > self.capacity:
            self._allocate(capacity)

    def reset(self, row: int) -> None:
        """A new leg takes this row: forget everything the previous one left."""
        self.have[row] = False
        self.started[row] = False
        self.fresh[row] = False
        self.count[row] = 0
        self.late_run[row] = 0
        self.last_frame[row] = 0.0
        self.fade[row] = 1.0
        self.delay[row] = 0.0
        self.packets_late[row] = 0
        self.concealed[row] = 0
        self.last_arrival[row] = -1e18

    def resync(self, row: int) -> None:
        """New SSRC or a timestamp jump: take the next packet as the new reference."""
        self.started[row] = False
        self.have[row] = False

    # --- per packet -----------------------------------------------------------------

    def put(self, row: int, timestamp: int, payload: memoryview, arrival: float) -> bool:
        """Store one packet's codec bytes. ``arrival`` is local time in codec samples.

        Returns False when the packet came too late to be played (counted).
        """
        n = len(payload)
        if not self.started[row]:
            self.started[row] = True
            self.fresh[row] = True
            self.base[row] = arrival - (timestamp + n)
            self.play[row] = timestamp
            self.transit[row] = 0.0
            self.count[row] = 0
        play = int(self.play[row])
        ext = play + ((timestamp - play + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        transit = arrival - self.base[row] - (ext + n)
        self.transit[row, self.count[row] % HISTORY] = transit
        self.count[row] += 1
        self.last_arrival[row] = arrival
        self.packet[row] = n
        self.align[row] = (ext + n) % n
        if ext + n > play + RING - self.frame:  # far ahead: the sender's clock jumped
            self.resync(row)
            return self.put(row, timestamp, payload, arrival)
        skip = play - ext if not self.fresh[row] else 0
        if skip >= n:
            self.packets_late[row] += 1
            self.late_run[row] += 1
            if self.late_run[row] >= LATE_RESYNC:
                self.resync(row)
            return False
        self.late_run[row] = 0
        skip = max(skip, 0)
        data = np.frombuffer(payload, np.uint8)[skip:]
        start = (ext + skip) & (RING - 1)
        end = start + len(data)
        if end <= RING:
            self.ring[row, start:end] = data
            self.have[row, start:end] = True
        else:
            split = RING - start
            self.ring[row, start:] = data[:split]
            self.have[row, start:] = True
            self.ring[row, : end - RING] = data[split:]
            self.have[row, : end - RING] = True
        return True

    # --- per tick, all rows -------------------------------------------------------------

    def playout(
        self, rows: np.ndarray, now: float, talking: np.ndarray, table: np.ndarray, law: np.ndarray
    ) -> np.ndarray:
        """This tick's decoded frame for each row in ``rows`` (float32, rows × frame).

        ``now`` is the tick's ideal time in codec samples; ``table`` is the
        (laws × 256) decode table and ``law`` each row's index into it. Rows that
        have never received audio give silence and are not counted as concealed.
        """
        frame = self.frame
        out = np.zeros((len(rows), frame), np.float32)
        live = self.started[rows]
        if not live.any():
            return out
        r = rows[live]
        slowest = self.transit[r].max(axis=1)
        fastest = self.transit[r].min(axis=1)
        local = now - self.base[r]
        # Everything up to `ready` has surely arrived by now; a frame may only use whole
        # packets, so round down to where a packet ends.
        ready = np.floor(local - slowest - MARGIN).astype(np.int64)
        ready -= (ready - self.align[r]) % self.packet[r]
        target = ready - frame
        play = self.play[r]
        fresh = self.fresh[r]
        diff = target - play
        back = diff < 0
        creep = np.where(talking[live], CREEP_TALKING, frame)
        forward = (diff > FORWARD_HYSTERESIS) & ~back
        step = np.where(fresh | back, diff, np.where(forward, np.minimum(diff, creep), 0))
        if forward.any():  # forget what is skipped, so the ring cannot replay it a lap later
            for i in np.flatnonzero(forward & ~fresh).tolist():
                skipped = (play[i] + np.arange(step[i])) & (RING - 1)
                self.have[r[i], skipped] = False
        play = play + step
        self.fresh[r] = False
        idx = (play[:, None] + self._arange) & (RING - 1)
        rr = r[:, None]
        codes = self.ring[rr, idx]
        present = self.have[rr, idx]
        self.have[rr, idx] = False
        pcm = table[law[r][:, None], codes]
        missing = ~present
        if missing.any():
            lost_rows = missing.any(axis=1)
            recent = (now - self.last_arrival[r]) < 10 * frame  # still sending: real loss
            fade = self.fade[r]
            pcm = np.where(present, pcm, self.last_frame[r] * fade[:, None])
            whole = missing.all(axis=1)
            self.fade[r] = np.where(whole, fade * PLC_FADE, np.where(lost_rows, fade, 1.0))
            counted = missing.sum(axis=1) * recent
            self.concealed[r] += counted
        else:
            self.fade[r] = 1.0
        self.last_frame[r] = pcm
        self.play[r] = play + frame
        self.delay[r] = local - frame - play - fastest
        out[live] = pcm
        return out
