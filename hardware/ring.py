"""A float32 ring between two processes: one side writes, the other reads, and no lock.

The sound card's callback runs in a process of its own (see ``card_process``), so the
FIFOs between it and the tick live in shared memory. A lock shared by two processes
could be held by a thread that lost its GIL, and the audio callback would wait behind
it: instead each side owns one counter (samples written, samples read, since the
start) and advances it only after it has touched the samples. The reader never sees
a sample not yet written, the writer never overwrites one not yet read.

Only the reader may move the read counter, so a writer that wants the oldest samples
gone (the tick trimming latency out of the playback FIFO) *asks* the reader to skip
them, and the reader does at its next read.

Ordering: "after" must hold on every CPU, not only on x86-64 (which keeps stores in
order by itself): on arm64 a reader could see the counter move before the samples
and read a stale one. So pushing, popping and asking for a skip are C (``shared.h``,
through ``_callback.c`` here and ``_elastic.c`` for the FIFOs' moves), with C11
acquire/release atomics — the same functions the card's callback uses on the other
side. ``level`` and ``queued`` only read counters (one aligned 64-bit load each, never
torn), so NumPy reads them.
"""

from __future__ import annotations

import numpy as np

from . import _callback

_WRITTEN, _READ, _SKIP_ASKED, _SKIP_DONE = range(4)
HEADER_BYTES = _callback.RING_HEADER_BYTES  # four int64 counters, then the samples


class SharedRing:
    """Single-writer, single-reader float32 FIFO over ``buffer`` (e.g. a SharedMemory's)."""

    def __init__(self, buffer: memoryview, capacity: int, offset: int = 0) -> None:
        self.counters = np.ndarray(4, np.int64, buffer, offset)
        self.buf = np.ndarray(capacity, np.float32, buffer, offset + HEADER_BYTES)
        self.capacity = capacity

    @staticmethod
    def nbytes(capacity: int) -> int:
        return HEADER_BYTES + 4 * capacity

    @property
    def address(self) -> int:
        """Where the ring starts in this process (for the C callback)."""
        return self.counters.ctypes.data

    def reset(self) -> None:
        """Empty it; only while no other process uses it."""
        self.counters[:] = 0

    @property
    def level(self) -> int:
        """Samples written and not yet read (skips asked for but not yet done included)."""
        c = self.counters
        return int(c[_WRITTEN] - c[_READ])

    @property
    def queued(self) -> int:
        """What the reader will still play: the level less the skips it has yet to do."""
        c = self.counters
        return max(0, int(c[_WRITTEN] - c[_READ] - (c[_SKIP_ASKED] - c[_SKIP_DONE])))

    # --- the writer's side ---------------------------------------------------------

    def push(self, x: np.ndarray) -> int:
        """Append as much of ``x`` as fits; returns how many (newest) samples did not."""
        return _callback.ring_push(self.counters, self.buf, np.ascontiguousarray(x, np.float32))

    def ask_skip(self, n: int) -> None:
        """Ask the reader to drop the ``n`` oldest samples before it reads again."""
        if n > 0:
            _callback.ring_ask_skip(self.counters, int(n))

    # --- the reader's side ---------------------------------------------------------

    def pop_into(self, out: np.ndarray) -> int:
        """Fill ``out`` from the front (after any skip asked for); returns how many were there."""
        if out.dtype != np.float32 or not out.flags.c_contiguous:
            raise TypeError("pop_into needs a contiguous float32 array")
        return _callback.ring_pop(self.counters, self.buf, out)

    def pop_all(self) -> np.ndarray:
        out = np.empty(self.level, np.float32)
        return out[: self.pop_into(out)]
