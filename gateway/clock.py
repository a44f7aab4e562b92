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
from collections.abc import Awaitable, Callable

import numpy as np

Sleep = Callable[[float], Awaitable[None]]
log = logging.getLogger(__name__)
LATE_LOG_EVERY_S = 10.0


class LatenessLog:
    """The last ``size`` tick latenesses (seconds), for p50/p99 without unbounded memory."""

    def __init__(self, size: int = 3000) -> None:
        self.values = np.zeros(size, np.float64)
        self.count = 0

    def add(self, lateness: float) -> None:
        self.values[self.count % len(self.values)] = lateness
        self.count += 1

    def recent(self) -> np.ndarray:
        return self.values[: min(self.count, len(self.values))]

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
        self.due = 0.0  # the running tick's deadline (after any skip)
        self._running = False

    def deadline(self, k: int) -> float:
        assert self.start is not None
        return self.start + k * self.period

    async def run(self, ticks: int | None = None) -> None:
        """Tick until :meth:`stop` (or ``ticks`` ticks). Tick errors propagate."""
        self._running = True
        self.start = self.now()
        k = 0
        while self._running and (ticks is None or self.ticks < ticks):
            due = self.deadline(k)
            wait = due - self.now()
            if wait > 0:
                await self.sleep(wait)
            late = self.now() - due
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
            self.on_tick()
            self.ticks += 1
            k += 1
            if wait <= 0:
                await asyncio.sleep(0)  # let sockets and timers run even when behind

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

    def shift(self, seconds: float) -> None:
        """Move every later tick by ``seconds`` (negative: earlier); see ``PhaseLock``."""
        if self.start is not None:
            self.start += seconds

    def stop(self) -> None:
        self._running = False


class PhaseLock:
    """Moves the ticks to where a sound card's cycle wants them: its middle.

    A card whose period divides the frame sees every tick at the same point of its cycle
    (``SoundCard.tick_phase``). Every ``every`` ticks this moves the ticks toward the
    middle: at once while all audio is silence (between overs, and at start; each card
    tops its FIFOs up with silence for the move: ``Port.ticks_moved``), else by
    at most ``step`` (0.2 ms a half second at 20 ms frames, 400 ppm: inside what the
    FIFOs' drift control follows). Not within ``deadband`` (1 ms: a tenth of the half period it
    buys at period 960), so it does not hunt on jitter. Once there it
    follows the card's crystal: the engine then runs on the card's clock, which network
    legs' jitter buffers take as any far clock.
    """

    def __init__(
        self, clock: MediaClock, every: int = 25, step: float = 0.0002, deadband: float = 0.001
    ) -> None:
        self.clock, self.every, self.step, self.deadband = clock, every, step, deadband
        self.ticks = 0
        self.moves = 0
        self.moved = 0.0  # seconds the ticks were moved in all, for the logs and tests

    def update(self, phase: Callable[[], tuple[float, bool] | None]) -> float:
        """Once a tick; every ``every`` ticks asks ``phase()`` how far past the middle of
        the card's cycle the ticks fall and whether its audio is silence (None: no card
        cares). Returns how far the ticks were moved (seconds later; 0: not moved)."""
        self.ticks += 1
        if self.ticks % self.every:
            return 0.0
        where = phase()
        if where is None or abs(where[0]) <= self.deadband:
            return 0.0
        past, quiet = where
        move = -past if quiet else -max(-self.step, min(self.step, past))
        self.clock.shift(move)
        self.moves += 1
        self.moved += move
        return move
