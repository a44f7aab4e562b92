"""Adaptive jitter buffers for all SIP legs at once, with packet-loss concealment.

Why one object for every leg: at hundreds of calls the per-leg Python work is
the budget to watch, so each leg is a *row* in shared arrays. A packet is
written into its row's ring (codec bytes addressed by RTP timestamp, so reordering
and duplicates need no bookkeeping); once per tick every leg's next frame is
gathered, decoded and concealed in a handful of NumPy calls.

Per packet only plain Python arithmetic runs (timestamp unwrapping, lateness,
the transit sample); the packet's bytes and transit are queued and written into
the arrays for all legs at once when the tick plays out.

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

RING = 4096  # codec samples per leg (512 ms at 8 kHz): the most a buffer can hold
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
        self._arange = np.arange(frame, dtype=np.int32)  # int32 indices: half the memory traffic
        self.capacity = 0
        # Per-row scalars touched per packet live in Python lists (a NumPy scalar
        # access costs more than the arithmetic); the tick converts what it needs.
        self.started: list[bool] = []
        self.fresh: list[bool] = []
        self.base: list[float] = []  # local units minus RTP time at sync
        self.play_at: list[int] = []  # mirror of `play` for packets between ticks
        self.count: list[int] = []  # transits recorded (position in the history)
        self.late_run: list[int] = []
        self.packet: list[int] = []  # samples per packet (ptime)
        self.align: list[int] = []  # where packets end, modulo their size
        self.last_arrival: list[float] = []
        self.packets_late: list[int] = []
        self._queue_rows: list[int] = []
        self._queue_starts: list[int] = []
        self._queue_data: list[bytes] = []
        self._transit_rows: list[int] = []
        self._transit_pos: list[int] = []
        self._transit_val: list[float] = []
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        old, n = self.capacity, self.capacity
        extra = capacity - old

        def widen(array: np.ndarray | None, shape: tuple, dtype, fill=0) -> np.ndarray:  # noqa: ANN001
            new = np.full(shape, fill, dtype)
            if array is not None:
                new[:n] = array
            return new

        get = self.__dict__.get
        self.ring = widen(get("ring"), (capacity, RING), np.uint8)
        self.have = widen(get("have"), (capacity, RING), bool, False)
        self.play = widen(get("play"), (capacity,), np.int64)
        self.transit = widen(get("transit"), (capacity, HISTORY), np.float64)
        self.last_frame = widen(get("last_frame"), (capacity, self.frame), np.float32)
        self.fade = widen(get("fade"), (capacity,), np.float32, 1.0)
        self.delay = widen(get("delay"), (capacity,), np.float64)
        self.concealed = widen(get("concealed"), (capacity,), np.int64)
        self.started += [False] * extra
        self.fresh += [False] * extra
        self.base += [0.0] * extra
        self.play_at += [0] * extra
        self.count += [0] * extra
        self.late_run += [0] * extra
        self.packet += [160] * extra
        self.align += [0] * extra
        self.last_arrival += [-1e18] * extra
        self.packets_late += [0] * extra
        self.capacity = capacity

    def reset(self, row: int) -> None:
        """A new leg takes this row: forget everything the previous one left."""
        self._drop_queued(row)
        self.have[row] = False
        self.started[row] = self.fresh[row] = False
        self.count[row] = self.late_run[row] = self.packets_late[row] = 0
        self.last_frame[row] = 0.0
        self.fade[row] = 1.0
        self.delay[row] = 0.0
        self.concealed[row] = 0
        self.last_arrival[row] = -1e18

    def resync(self, row: int) -> None:
        """New SSRC or a timestamp jump: take the next packet as the new reference."""
        self._drop_queued(row)
        self.started[row] = False
        self.have[row] = False

    def _drop_queued(self, row: int) -> None:
        if row in self._queue_rows:
            keep = [i for i, r in enumerate(self._queue_rows) if r != row]
            self._queue_rows = [self._queue_rows[i] for i in keep]
            self._queue_starts = [self._queue_starts[i] for i in keep]
            self._queue_data = [self._queue_data[i] for i in keep]

    # --- per packet -----------------------------------------------------------------

    def put(self, row: int, timestamp: int, payload: memoryview, arrival: float) -> bool:
        """Queue one packet's codec bytes. ``arrival`` is local time in codec samples.

        Returns False when the packet came too late to be played (counted).
        """
        n = len(payload)
        if not self.started[row]:
            self.started[row] = True
            self.fresh[row] = True
            self.base[row] = arrival - (timestamp + n)
            self.play_at[row] = timestamp
            self.transit[row] = 0.0
            self.count[row] = 0
        play = self.play_at[row]
        ext = play + ((timestamp - play + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        if ext + n > play + RING - self.frame:  # far ahead: the sender's clock jumped
            self.resync(row)
            return self.put(row, timestamp, payload, arrival)
        count = self.count[row]
        self._transit_rows.append(row)
        self._transit_pos.append(count % HISTORY)
        self._transit_val.append(arrival - self.base[row] - (ext + n))
        self.count[row] = count + 1
        self.last_arrival[row] = arrival
        self.packet[row] = n
        self.align[row] = (ext + n) % n
        skip = 0 if self.fresh[row] else play - ext
        if skip >= n:
            self.packets_late[row] += 1
            self.late_run[row] += 1
            if self.late_run[row] >= LATE_RESYNC:
                self.resync(row)
            return False
        self.late_run[row] = 0
        if skip > 0:
            payload = payload[skip:]
            ext += skip
        self._queue_rows.append(row)
        self._queue_starts.append(ext)
        self._queue_data.append(payload)
        return True

    def _commit(self) -> None:
        """Write every queued packet and transit into the arrays (a few NumPy calls)."""
        if self._transit_rows:
            self.transit[self._transit_rows, self._transit_pos] = self._transit_val
            self._transit_rows, self._transit_pos, self._transit_val = [], [], []
        if not self._queue_rows:
            return
        rows, starts, data = self._queue_rows, self._queue_starts, self._queue_data
        self._queue_rows, self._queue_starts, self._queue_data = [], [], []
        sizes = [len(d) for d in data]
        n = sizes[0]
        ring, have = self.ring.reshape(-1), self.have.reshape(-1)
        if all(size == n for size in sizes):
            codes = np.frombuffer(b"".join(data), np.uint8)
            starts_mod = np.array(starts, np.int64) & (RING - 1)  # RTP time is 64-bit here
            offsets = (starts_mod.astype(np.int32)[:, None] + np.arange(n, dtype=np.int32)) & (
                RING - 1
            )
            flat = (offsets + np.array(rows, np.int32)[:, None] * RING).reshape(-1)
            ring[flat] = codes
            have[flat] = True
            return
        for row, start, chunk in zip(rows, starts, data, strict=True):
            flat = row * RING + ((start + np.arange(len(chunk))) & (RING - 1))
            ring[flat] = np.frombuffer(chunk, np.uint8)
            have[flat] = True

    # --- per tick, all rows -------------------------------------------------------------

    def playout(
        self, rows: np.ndarray, now: float, talking: np.ndarray, table: np.ndarray, law: np.ndarray
    ) -> np.ndarray:
        """This tick's decoded frame for each row in ``rows`` (float32, rows × frame).

        ``now`` is the tick's ideal time in codec samples; ``table`` is the
        (laws × 256) decode table and ``law`` each row's index into it. Rows that
        have never received audio give silence and are not counted as concealed.
        """
        self._commit()
        frame = self.frame
        out = np.zeros((len(rows), frame), np.float32)
        row_list = rows.tolist()
        live = np.array([self.started[i] for i in row_list], bool)
        if not live.any():
            return out
        r = rows[live]
        r_list = r.tolist()
        history = self.transit[r]
        slowest = history.max(axis=1)
        fastest = history.min(axis=1)
        local = now - np.array([self.base[i] for i in r_list])
        # Everything up to `ready` has surely arrived by now; a frame may only use whole
        # packets, so round down to where a packet ends.
        ready = np.floor(local - slowest - MARGIN).astype(np.int64)
        packet = np.array([self.packet[i] for i in r_list], np.int64)
        ready -= (ready - np.array([self.align[i] for i in r_list], np.int64)) % packet
        target = ready - frame
        fresh = np.array([self.fresh[i] for i in r_list], bool)
        play = np.where(fresh, target, self.play[r])
        diff = target - play
        back = diff < 0
        creep = np.where(talking[live], CREEP_TALKING, frame)
        forward = (diff > FORWARD_HYSTERESIS) & ~back
        step = np.where(back, diff, np.where(forward, np.minimum(diff, creep), 0))
        have = self.have.reshape(-1)
        row_base = r.astype(np.int32)[:, None] * RING
        play_mod = (play & (RING - 1)).astype(np.int32)  # positions in the ring, before stepping
        if forward.any():  # forget what is skipped, so the ring cannot replay it a lap later
            f = np.flatnonzero(forward)
            skipped = row_base[f] + ((play_mod[f, None] + self._arange) & (RING - 1))
            have[skipped[self._arange < step[f, None]]] = False
        play = play + step
        for i in np.flatnonzero(fresh).tolist():
            self.fresh[r_list[i]] = False
        start = (play & (RING - 1)).astype(np.int32)
        flat = row_base + ((start[:, None] + self._arange) & (RING - 1))
        codes = self.ring.reshape(-1).take(flat)
        present = have.take(flat)
        have[flat] = False
        laws = law[r]
        if (laws == laws[0]).all():  # the usual case: one codec for every leg
            pcm = table[laws[0]].take(codes)
        else:
            pcm = table.reshape(-1).take(codes + (laws * table.shape[1])[:, None])
        missing = ~present
        if missing.any():
            lost_rows = missing.any(axis=1)
            arrived = np.array([self.last_arrival[i] for i in r_list])
            recent = (now - arrived) < 10 * frame  # still sending: real loss
            fade = self.fade[r]
            pcm = np.where(present, pcm, self.last_frame[r] * fade[:, None])
            whole = missing.all(axis=1)
            self.fade[r] = np.where(whole, fade * PLC_FADE, np.where(lost_rows, fade, 1.0))
            self.concealed[r] += missing.sum(axis=1) * recent
        else:
            self.fade[r] = 1.0
        self.last_frame[r] = pcm
        self.play[r] = play + frame
        for i, value in zip(r_list, (play + frame).tolist(), strict=True):
            self.play_at[i] = value
        self.delay[r] = local - frame - play - fastest
        out[live] = pcm
        return out
