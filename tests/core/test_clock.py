"""The media clock schedules on absolute deadlines: lateness never accumulates."""

from __future__ import annotations

import asyncio
import random

from gateway.clock import MediaClock


class FakeTime:
    """A clock whose sleeps overshoot by random amounts, like a busy machine's."""

    def __init__(self, seed: int = 1, overshoot: float = 0.004) -> None:
        self.t = 1000.0
        self.rng = random.Random(seed)
        self.overshoot = overshoot
        self.stall_at: dict[int, float] = {}
        self.ticks = 0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds + self.rng.uniform(0, self.overshoot)

    def on_tick(self) -> None:
        self.t += 0.0005  # the tick's own work
        self.t += self.stall_at.get(self.ticks, 0.0)
        self.ticks += 1


def test_no_drift_after_10000_ticks() -> None:
    fake = FakeTime()
    clock = MediaClock(0.02, fake.on_tick, now=fake.now, sleep=fake.sleep)
    asyncio.run(clock.run(ticks=10_000))
    assert clock.ticks == 10_000
    # Where tick 10 000 started versus where it was due: bounded by one oversleep
    # plus one tick's work, not 10 000 of them (a sleep(period) loop would be ~25 s off).
    error = clock.lateness.recent()[-1]
    assert 0 <= error <= 0.0045 + 0.0005
    assert clock.lateness.percentile(99) <= 0.005
    assert clock.late_ticks == 0


def test_stall_counts_late_ticks_then_catches_up_on_schedule() -> None:
    fake = FakeTime(overshoot=0.0)
    fake.stall_at = {100: 0.07}  # 70 ms stall: 3 ticks overdue, within catch-up
    clock = MediaClock(0.02, fake.on_tick, now=fake.now, sleep=fake.sleep)
    asyncio.run(clock.run(ticks=200))
    assert clock.late_ticks >= 2 and clock.skipped_ticks == 0
    assert clock.lateness.recent()[-1] < 0.001  # back on the original grid


def test_long_stall_skips_ahead_instead_of_bursting() -> None:
    fake = FakeTime(overshoot=0.0)
    fake.stall_at = {50: 1.0}  # a one-second stall
    clock = MediaClock(0.02, fake.on_tick, now=fake.now, sleep=fake.sleep)
    asyncio.run(clock.run(ticks=100))
    assert 45 <= clock.skipped_ticks <= 50
    assert clock.lateness.recent()[-1] < 0.001
