"""The media clock schedules on absolute deadlines: lateness never accumulates."""

from __future__ import annotations

import asyncio
import random
import time

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


# --- on the event loop's own timers (the clock a site runs) -------------------------------


def test_on_timers_runs_the_ticks_asked_on_the_deadline_grid() -> None:
    dues: list[float] = []
    clock = MediaClock(0.005, lambda: dues.append(clock.due))
    asyncio.run(clock.run(ticks=20))
    assert clock.ticks == 20 and len(dues) == 20
    steps = [b - a for a, b in zip(dues, dues[1:], strict=False)]
    # each tick's deadline is a whole number of periods on (skips only after a stall)
    assert all(abs(s / 0.005 - round(s / 0.005)) < 1e-6 and s > 0 for s in steps)


def test_on_timers_a_tick_error_propagates_and_no_tick_follows() -> None:
    ticked: list[int] = []

    def tick() -> None:
        ticked.append(clock.ticks)
        if clock.ticks == 3:
            raise RuntimeError("broken tick")

    clock = MediaClock(0.005, tick)

    async def main() -> None:
        try:
            await clock.run()
        except RuntimeError as exc:
            await asyncio.sleep(0.05)  # ten periods: a tick scheduled anyway would have run
            raise exc

    try:
        asyncio.run(main())
    except RuntimeError as exc:
        assert str(exc) == "broken tick"
    else:
        raise AssertionError("the tick's error did not propagate")
    assert ticked == [0, 1, 2, 3]


def test_on_timers_stop_and_cancel_end_the_ticks() -> None:
    async def main() -> tuple[int, int]:
        stopping = MediaClock(0.005, lambda: stopping.ticks == 4 and stopping.stop())
        await stopping.run()  # returns: stopped from a tick
        cancelled = MediaClock(0.005, lambda: None)
        task = asyncio.create_task(cancelled.run())
        while cancelled.ticks < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        at_cancel = cancelled.ticks
        await asyncio.sleep(0.05)
        return stopping.ticks, cancelled.ticks - at_cancel

    stopped_at, after_cancel = asyncio.run(main())
    assert stopped_at == 5  # the tick that asked to stop ran to its end
    assert after_cancel == 0


def test_on_timers_a_tick_due_as_the_run_is_cancelled_does_not_raise() -> None:
    """The gateway stops the clock and cancels its task in one go; the next tick's timer
    may already be due, ahead of the task's wake-up, and must then do nothing (it raised
    InvalidStateError into the loop's exception handler)."""

    async def main() -> list[dict]:
        loop = asyncio.get_running_loop()
        errors: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        clock = MediaClock(0.01, lambda: None)
        task = asyncio.create_task(clock.run())
        while clock.ticks < 2:
            await asyncio.sleep(0.001)

        def stop_and_cancel() -> None:
            clock.stop()
            task.cancel()

        loop.call_at(clock.deadline(clock.ticks) - 0.002, stop_and_cancel)
        time.sleep(0.03)  # hold the loop: both fall due, stop_and_cancel's first
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.03)
        return errors

    errors = asyncio.run(main())
    assert errors == [], errors[0].get("exception")
