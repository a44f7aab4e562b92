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

Ordering: this relies on a store to the counter becoming visible after the stores to
the samples before it, which x86-64 guarantees. On a weakly ordered CPU (ARM) a
reader could in principle see a counter a few samples ahead of the data: at worst
a stale sample from one ring length ago, never a crash.
"""

from __future__ import annotations

import numpy as np

_WRITTEN, _READ, _SKIP_ASKED, _SKIP_DONE = range(4)
HEADER_BYTES = 4 * 8


class SharedRing:
    """Single-writer, single-reader float32 FIFO over ``buffer`` (e.g. a SharedMemory's)."""

    def __init__(self, buffer: memoryview, capacity: int, offset: int = 0) -> None:
        self.counters = np.ndarray(4, np.int64, buffer, offset)
        self.buf = np.ndarray(capacity, np.float32, buffer, offset + HEADER_BYTES)
        self.capacity = capacity

    @staticmethod
    def nbytes(capacity: int) -> int:
        return HEADER_BYTES + 4 * capacity

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
        c, cap = self.counters, self.capacity
        written = int(c[_WRITTEN])
        room = cap - (written - int(c[_READ]))
        n = min(len(x), room)
        start = written % cap
        first = min(n, cap - start)
        self.buf[start : start + first] = x[:first]
        self.buf[: n - first] = x[first:n]
        c[_WRITTEN] = written + n  # after the samples: the reader may take them now
        return len(x) - n

    def ask_skip(self, n: int) -> None:
        """Ask the reader to drop the ``n`` oldest samples before it reads again."""
        if n > 0:
            self.counters[_SKIP_ASKED] += n

    # --- the reader's side ---------------------------------------------------------

    def pop_into(self, out: np.ndarray) -> int:
        """Fill ``out`` from the front (after any skip asked for); returns how many were there."""
        c, cap = self.counters, self.capacity
        read = int(c[_READ])
        asked = int(c[_SKIP_ASKED])
        if asked != c[_SKIP_DONE]:
            read += min(asked - int(c[_SKIP_DONE]), int(c[_WRITTEN]) - read)
            c[_SKIP_DONE] = asked
        n = min(len(out), int(c[_WRITTEN]) - read)
        start = read % cap
        first = min(n, cap - start)
        out[:first] = self.buf[start : start + first]
        out[first:n] = self.buf[: n - first]
        c[_READ] = read + n  # after the copy: the writer may reuse the room now
        return n

    def pop_all(self) -> np.ndarray:
        out = np.empty(self.level, np.float32)
        return out[: self.pop_into(out)]
