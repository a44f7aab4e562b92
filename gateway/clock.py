"""The media clock: ticks on absolute deadlines so the schedule never drifts.

Tick k is due at ``start + k * period``. A late wake-up makes that one tick late,
not every tick after it (as ``sleep(period)`` in a loop would). When the loop
falls more than ``max_catch_up`` ticks behind (a stalled machine), it skips
ahead instead of bursting, and counts what it skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import Awaitable, Callable

import numpy as np

Sleep = Callable[[float], Awaitable[None]]
log = logging.getLogger(__name__)
LATE_LOG_EVERY_S = 10.0


class LatenessLog:
    """The last ``size`` tick latenesses (seconds), for p50/p99 without unbounded memory.

    Kept in an ``array``, read as NumPy: a float stored each tick stays in Python's own
    code (a NumPy item assignment costs several µs from a sleeping process's cold caches).
    """

    def __init__(self, size: int = 3000) -> None:
        self.values = array("d", bytes(8 * size))
        self.count = 0

    def add(self, lateness: float) -> None:
        self.values[self.count % len(self.values)] = lateness
        self.count += 1

    def recent(self) -> np.ndarray:
        return np.frombuffer(self.values, np.float64)[: min(self.count, len(self.values))]

    def percentile(self, q: float) -> float:
        recent = self.recent()
        return float(np.percentile(recent, q)) if recent.size else 0.0


class MediaClock:
    def __init__(
        self,
        period: float,
        on_tick: Callable[[], None],
        *,
        now: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        max_catch_up: int = 5,
    ) -> None:
        self.period = period
        self.on_tick = on_tick
        self.now = now
        self.sleep = sleep
        self.max_catch_up = max_catch_up
        self.ticks = 0
        self.late_ticks = 0  # started more than one period after their deadline
        self.skipped_ticks = 0
        self.lateness = LatenessLog()
        self.start: float | None = None
        self.due = 0.0  # the running tick's deadline (after skips): when its audio belongs
        self._running = False
        self._timer: asyncio.TimerHandle | None = None  # the next tick's (event loop's clock)

    def deadline(self, k: int) -> float:
        assert self.start is not None
        return self.start + k * self.period

    async def run(self, ticks: int | None = None) -> None:
        """Tick until :meth:`stop` (or ``ticks`` ticks). Tick errors propagate."""
        self._running = True
        self.start = self.now()
        if self.sleep is asyncio.sleep:
            await self._run_on_timers(ticks)
        else:  # simulated time (tests): its sleep is the only way to wait
            await self._run_sleeping(ticks)

    async def _run_on_timers(self, ticks: int | None) -> None:
        """Each tick runs from the event loop's timer for its deadline, and sets the next
        one: one loop pass a tick. (A task sleeping between ticks costs a future, a
        second pass and a task step each tick: 180 µs of CPU a tick against 120 µs, on
        a small virtual machine where the wake-up alone costs 55 µs.) A deadline already
        past runs at the loop's next pass, after its sockets: a clock that is behind
        still lets them run."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        offset = loop.time() - self.now()  # our deadlines on the loop's clock

        def fire(k: int) -> None:
            if done.done():  # run's task cancelled while this timer was already due
                return
            if not self._running:  # stopped between two ticks
                done.set_result(None)
                return
            try:
                k = self._begin(k)
                self.on_tick()
            except Exception as exc:
                done.set_exception(exc)
                return
            self.ticks += 1
            if ticks is not None and self.ticks >= ticks:
                done.set_result(None)
                return
            self._timer = loop.call_at(self.deadline(k + 1) + offset, fire, k + 1)

        if ticks is not None and ticks <= 0:
            return
        self._timer = loop.call_at(self.deadline(0) + offset, fire, 0)
        try:
            await done
        finally:
            if self._timer is not None:
                self._timer.cancel()  # (run's task cancelled: no tick after it)

    async def _run_sleeping(self, ticks: int | None) -> None:
        k = 0
        while self._running and (ticks is None or self.ticks < ticks):
            wait = self.deadline(k) - self.now()
            if wait > 0:
                await self.sleep(wait)
            k = self._begin(k)
            self.on_tick()
            self.ticks += 1
            k += 1
            if wait <= 0:
                await asyncio.sleep(0)  # let sockets and timers run even when behind

    def _begin(self, k: int) -> int:
        """Tick ``k`` starts now: its lateness, and the ticks skipped when it is far behind
        (returns the tick it is after skipping)."""
        late = self.now() - self.deadline(k)
        if late > self.max_catch_up * self.period:
            behind = int(late // self.period)
            self.skipped_ticks += behind
            k += behind
            late -= behind * self.period
        self.due = self.deadline(k)
        self.lateness.add(late)
        if late > self.period:
            self.late_ticks += 1
            self._log_late(late)
        return k

    def late_by(self) -> float:
        """How long after its deadline the running tick is now (0 before the clock runs).

        What a jitter buffer needs to place its playout point at the tick's ideal time:
        the wall clock minus this, whether the tick woke late or is one of a catch-up
        burst after a stall."""
        return max(0.0, self.now() - self.due) if self.start is not None else 0.0

    def _log_late(self, late: float) -> None:
        """Say so when ticks run late, at most every LATE_LOG_EVERY_S (a stall is many)."""
        now = self.now()
        if now - getattr(self, "_last_late_log", -LATE_LOG_EVERY_S) >= LATE_LOG_EVERY_S:
            self._last_late_log = now
            log.warning(
                "media tick %.1f ms late (%d late, %d skipped so far); the machine is overloaded",
                late * 1000,
                self.late_ticks,
                self.skipped_ticks,
            )

    def stop(self) -> None:
        self._running = False
