"""One direction of a sound card's audio: an elastic FIFO between the card and the tick.

The card runs on its own crystal, the engine on its own clock. Between them each
direction holds a small FIFO, and its *level at the tick's instant* (computed by the card
stream from its callback's timestamps: see ``soundcard``) is held at a fixed target,
one card period plus a margin (transmit: plus a late tick's allowance too), by one PI
loop that bends a fine resampling ratio
(± ``max_ppm``). That is zalsa's scheme (zita-ajbridge): the level is measured as if the
card moved its audio continuously, so it does not saw-tooth with the card's periods or
the engine's frames, and needs no low-water windows.

Gross errors are corrected at once, and counted: a FIFO that ran dry is refilled with
silence to the target, and its margin widened once to ride what ran it dry: by how late
the tick (or the card) was, at least ``WIDEN_S``, at most
``WIDEN_STEP_S``, never above ``WIDEN_MAX_S`` over the configured margin. A 1 ms step
against a 25 ms stall would take a dozen underruns to learn; one far above the
target (the engine stalled) is trimmed back to it. At a stream's start the level goes
straight to the target, either way.

The same class serves both ways: receive (card → engine: the resampled audio waits in the
resampler's store, in the gateway, until the tick takes it) and transmit (engine → card:
the store is the card's playback ring). Moving audio is C (``_elastic.c``: one call per
move, ring and resampler together); the control, once a tick, is here.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
from gateway.codecs.interp import sinc_table

from ._elastic import Resampler
from .ring import SharedRing

# Rate conversion kernel: 8 zero crossings of the narrower band, pass band to 75 % of its
# Nyquist (flat to 4 kHz at 16 kHz; ≥ 72 dB alias rejection), 0.5 ms each way. soxr's
# variable-rate mode holds back 12.5 ms at 48 → 16 kHz (measured), a radio hop's budget.
ZERO_CROSSINGS = 8
PASSBAND = 0.75
TAU_S = 8.0  # proportional: a 1 ms error is corrected at 125 ppm
TI_S = 15.0  # integral: learns the crystal's steady drift
SMOOTH_S = 1.0  # the level's jitter (callbacks, ticks) is averaged over about this long
TRIM_S = 0.010  # a level this far above target is cut at once (the engine stalled)
WIDEN_S = 0.001  # the least one underrun adds to the margin
WIDEN_STEP_S = 0.010  # the most one underrun adds (a single freak stall buys no more)
WIDEN_MAX_S = 0.020  # …up to this much above the configured margin


class Store(Protocol):
    """Where a FIFO's audio waits, for corrections at once: the resampler's own store
    (receive) or the card's playback ring (transmit)."""

    def cut(self, count: int) -> int:
        """Drop up to ``count`` of the oldest samples; returns how many there were."""

    def pad(self, count: int) -> None:
        """Silence where the audio continues next."""


class ElasticFifo:
    """A resampler whose ratio holds the level at the tick at the target. ``store``: the
    transmit FIFO's (the card's playback ring); None for receive, whose audio waits in the
    resampler until the tick takes it."""

    def __init__(
        self,
        store: Store | None,
        in_rate: int,
        out_rate: int,
        margin: float,
        max_ppm: float,
        late_tick: float = 0.0,
    ) -> None:
        self.ring_store, self.in_rate, self.out_rate = store, in_rate, out_rate
        self.late_tick = late_tick  # seconds in the target for a late tick (transmit)
        self.margin = self.base_margin = margin
        self.limit = max_ppm * 1e-6
        self.bound = self.limit * TAU_S  # the integral's: it alone may pull the ratio to the limit
        self.resampler = _resampler(in_rate, out_rate)
        self.ratio = 1.0  # < 1: fewer samples out than the nominal rates give
        self.step = in_rate / out_rate  # input samples per output, at this ratio
        self.error = 0.0  # the level's smoothed error (seconds)
        self.integral = 0.0
        self.level = 0.0  # at the last tick (seconds)
        self.dry = True  # to be filled to the target at the next tick (start, underrun)
        self.underruns = self.widenings = self.dropped = 0

    @property
    def store(self) -> Store:
        return self.ring_store or self.resampler

    # --- receive: card's ring → resampler's store → tick -------------------------

    def capture(self, ring: SharedRing, status: np.ndarray, clock: np.ndarray) -> tuple[int, float]:
        """At the end of the tick: the card's last finished callback's stamp (its first
        frame, its ``time.monotonic()``), and all the card captured up to it (and no
        further) resampled into the store, read as one consistent set."""
        return self.resampler.capture(ring.counters, ring.buf, self.step, status, clock)

    def take(self, ring: SharedRing, out: np.ndarray) -> int:
        """All the card's capture ring holds, resampled at the current ratio into the
        store, then the oldest waiting audio into ``out`` (float32); returns how much
        there was."""
        return self.resampler.take(ring.counters, ring.buf, self.step, out)

    @property
    def waiting(self) -> int:
        """Resampled samples waiting for the tick (receive)."""
        return self.resampler.stored

    # --- transmit: tick → resampler → card's ring ---------------------------------

    def push(self, samples: np.ndarray, ring: SharedRing) -> int:
        """A frame resampled at the current ratio into the card's playback ring; returns
        how many resampled samples did not fit."""
        return self.resampler.push(samples, ring.counters, ring.buf, self.step)

    # --- control, once a tick ---------------------------------------------------------

    def ran_dry(self, late: float = 0.0) -> None:
        """The store ran out, ``late`` seconds after its audio was due (the tick's or the
        card's lateness): count it, widen the margin once by that lateness (bounded),
        refill at the next tick. What beat a margin was late by about the margin, so this
        about doubles it: the tail of a loaded machine's lateness is learnt in a few
        underruns, not one per millisecond."""
        self.underruns += 1
        self.dry = True
        ceiling = self.base_margin + WIDEN_MAX_S
        if self.margin < ceiling:
            step = min(max(late, WIDEN_S), WIDEN_STEP_S)
            self.margin = min(self.margin + step, ceiling)
            self.widenings += 1

    def end_of_tick(self, level: float, period: float, dt: float, on_time: bool = True) -> None:
        """The level at this tick's instant (seconds), the card's period and the tick's
        length: one step of the PI loop, or a correction at once. A FIFO that ran dry
        (or is starting) goes straight to its target once the card is ``on_time`` again
        (the audio a late card still owes would otherwise be latency)."""
        target = period + self.late_tick + self.margin
        self.level = level
        if self.dry:
            if on_time:
                self._jump(target - level)
                self.dry = False
        elif level > target + TRIM_S:
            self._jump(target - level)
        else:
            self._steer(level - target, dt)

    def _jump(self, seconds: float) -> None:
        """Silence in (``seconds`` > 0) or the oldest audio out, at once."""
        count = round(abs(seconds) * self.out_rate)
        if seconds > 0:
            self.store.pad(count)
        else:
            self.dropped += self.store.cut(count)
        self.level += seconds

    def _steer(self, error: float, dt: float) -> None:
        # (plain floats clipped by min/max: NumPy's clip costs 10 µs on a scalar)
        self.error += (error - self.error) * min(1.0, dt / SMOOTH_S)
        bound = self.bound
        self.integral = min(max(self.integral + self.error * dt / TI_S, -bound), bound)
        ratio = (self.error + self.integral) / TAU_S
        limit = self.limit
        self.ratio = 1.0 - min(max(ratio, -limit), limit)
        self.step = self.in_rate / self.out_rate / self.ratio

    @property
    def ppm(self) -> float:
        return (self.ratio - 1.0) * 1e6

    def restart(self, in_rate: int, out_rate: int) -> None:
        """A new stream (at these rates): keep the learnt ratio and margin, drop what
        waits for the old one, refill at the next tick."""
        if (in_rate, out_rate) != (self.in_rate, self.out_rate):
            self.in_rate, self.out_rate = in_rate, out_rate
            self.resampler = _resampler(in_rate, out_rate)
        self.resampler.cut(self.resampler.stored)
        self.step = in_rate / out_rate / self.ratio
        self.dry = True
        self.error = 0.0


def _resampler(in_rate: int, out_rate: int) -> Resampler:
    """One windowed-sinc stage: rate conversion and drift correction together."""
    band = min(1.0, out_rate / in_rate)
    half_width = math.ceil(ZERO_CROSSINGS / band)
    table, slope = sinc_table(PASSBAND * band, half_width)
    return Resampler(table, slope, 2 * half_width)
