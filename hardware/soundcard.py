"""A radio's sound card: its stream's rings ↔ engine frames, with the card's clock absorbed.

The card runs on its own crystal, and its stream in a process of its own
(``card_process``: the callback must never wait for the gateway's GIL); the engine
ticks on its own clock. Between them sits one small ring per direction, and no
fixed large buffer. Each direction's *low-water mark* (the least audio it held over
the last half second, i.e. how close it came to running dry) is steered to a small
margin by a PI control of a fine resampling ratio (± ``max_ppm``), so over hours
the ring neither underruns nor grows. The margin itself is learnt: it widens to
cover each dip of the level below its usual (a late callback or tick), whether it
ran the ring dry or not (then by how much audio was missing, too), and is held an
hour, so latency stays at what the jitter actually seen needs. Rate conversion and
drift correction are one windowed-sinc stage per direction (0.5 ms each), from
``codecs.interp``.

Gross errors are corrected at once and counted: an underrun re-primes the ring
(silence), a ring far above target (the engine stalled) is trimmed.

A card that stops calling back (unplugged, audio server gone) is reported by
:attr:`SoundCard.up` going False; its process is killed, and a new one is started
with backoff on a thread of the card's own until the device is back.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gateway.codecs.interp import SincInterpolator

from .card_process import (
    FINISHED,
    FRAMES,
    RX_DROPPED,
    TX_LOW,
    TX_LOW_WINDOW,
    TX_MISSING,
    TX_UNDERRUNS,
    WINDOW,
    XRUNS,
    CardBlock,
    CardProcess,
    Opened,
    OpenRequest,
    jack_client_name,
    stamp,
)
from .ring import SharedRing

log = logging.getLogger(__name__)

WINDOW_S = 0.5  # low-water marks are taken over this long
STALL_S = 0.3  # no callback for this long (≫ any period): the card is gone
DEADBAND_S = 0.0015
WIDEN_STEP_S = 0.001
WIDEN_MAX_S = 0.020
# The extra margin an underrun bought is kept an hour, then melts away slowly: the jitter
# that caused it (a late callback or tick on a busy machine) comes back every few minutes,
# and a margin that melted on a timer was back at its base, and underran again, by then.
HOLD_S = 3600.0
MELT_PER_MINUTE_S = 0.0001
TRIM_S = 0.010  # a low-water mark this far above target (a stall, a burst) is cut at once
# …and only this far while what would be cut is silence (between overs, at start): the
# PI control moves at most max_ppm (0.5 ms a second at 500 ppm), so a few ms of excess
# would otherwise sit as latency for seconds; cutting silence is inaudible. Likewise a
# level this far *below* target for a second window running (a margin just widened; one
# window is a dip, which the margin must learn from) is filled with silence at once while
# all the FIFO holds is silence: the wider margin is there before the next late callback,
# not after the ten seconds or more the control takes.
TRIM_QUIET_S = 0.0005
QUIET = 10 ** (-50 / 20)  # peak level below which audio counts as silence
STALE_S = 0.03  # received audio this far beyond target after a stall is dropped at once
STALE_TX_S = 0.03  # likewise for audio queued to the card
# An underrun this close (before or after) to an xrun the audio server reported, where the
# stream lost time (it skipped cycles: the card neither recorded nor played for that long),
# is the server's loss, not jitter the margin should have covered: it is counted apart and
# does not widen the margin, which could not ride it anyway. The tick may see the FIFO dry
# before the callback after the stall reports the xrun, so the decision waits this long.
XRUN_SHADOW_S = 0.5
# Nor is an underrun in a stream's first seconds learnt: the audio server's graph and the
# card settle, and where the ticks fall in the card's cycle is set by chance until the
# phase lock (``gateway.clock.PhaseLock``) has moved them; a margin widened for that would
# be kept an hour for a cause that is gone.
START_GRACE_S = 3.0
# A *dip* is a window whose low-water mark fell below the margin and at least 0.5 ms below
# both the FIFO's usual level before it (the median of the 3 windows before) and the
# window after it: a late callback or tick that did not quite run the FIFO dry, not the
# slow move of the level as the control steers it. If the dip is more than the margin
# holds above its base, the margin widens to base + dip at once, as an underrun of that
# depth (the usual level plus what was missing) makes it, but without the lost audio.
USUAL_WINDOWS = 3
# Where in the card's cycle the ticks fall is judged over the last this many (``tick_phase``).
PHASE_TICKS = 25
LOSS_BEFORE_S = 1.5  # stream time lost is judged against the callbacks this long before
LAG_KEPT_S = 3.0  # the stream's lag is kept this long, for ``stream_lost``
DIP_MIN_S = 0.0005
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0  # a vanished device is looked for at least this often
DEFAULT_RATE = 48000  # until the card has told its own
DEFAULT_PERIOD = 256  # until the card has called back
# Rate conversion kernel: 8 zero crossings of the narrower band, pass band to 75 % of its
# Nyquist (flat to 4 kHz at 16 kHz, −6 dB at 6 kHz; ≥ 72 dB alias/image rejection). A radio's
# own audio is 300–3000 Hz, so a 24-crossing, 90 % kernel (1.5 ms each way) bought nothing
# but 2 ms of radio→radio latency; this one holds 0.5 ms each way.
ZERO_CROSSINGS = 8
PASSBAND = 0.75


@dataclass
class Alarm:
    """A FIFO fell ``dip`` seconds below its usual level at ``when`` (or some time in the
    ``span`` seconds before), and ran ``dry`` or not: not yet blamed on the server or the
    margin. For an underrun the dip is the usual level plus what was missing."""

    when: float
    control: DriftControl
    dip: float
    dry: bool = False
    span: float = 0.0
    late: float = 0.0  # how late the side that feeds the FIFO came (see ``Underrun``)


@dataclass(frozen=True)
class Underrun:
    """A FIFO ran dry at ``when`` (monotonic seconds): ``way`` "rx" or "tx"; ``cause``:
    "xrun" (an audio-server xrun next to it), "start" (in the stream's first seconds), or
    "margin" (which then widened).

    ``late``: how late the side that fills the FIFO came, beyond its own rhythm, so an
    installer can tell a busy machine from a short margin: for receive, the card (time
    since its last callback beyond one period); for transmit, the media tick (time since
    the tick before it beyond one frame). ``lost``: stream time the audio server lost
    around it (its stream clock against the wall clock; ``SoundCard.stream_lost``), which
    drains a receive FIFO for good: the card neither recorded nor played that long."""

    when: float
    way: str
    cause: str
    late: float = 0.0
    lost: float = 0.0


class DriftControl:
    """PI control of a resampling ratio that holds a FIFO's low-water mark at ``target``.

    ``tau``: seconds to correct an error at the proportional rate (a 1 ms error at
    tau 8 s is 125 ppm); ``ti``: integral time, which learns the steady drift.
    The target itself adapts: a dip of the level below its usual (``USUAL_WINDOWS``)
    widens it to base + dip, and so does an underrun, by at least 1 ms (the jitter was
    worse than the margin allowed for); a widened margin is kept an hour after the last such
    event, then melted away at 0.1 ms a minute. The card does not widen for a dip
    or an underrun next to an audio-server xrun (``XRUN_SHADOW_S``).
    """

    def __init__(self, target: float, tau: float = 8.0, ti: float = 15.0, max_ppm: float = 500.0):
        self.target, self.tau, self.ti = target, tau, ti
        self.base = target
        self.limit = max_ppm * 1e-6
        self.integral = 0.0
        self.ratio = 1.0
        self.hold = 0.0  # seconds the widened margin is still kept

    def widen(self, dip: float = 0.0) -> None:
        """An underrun ``dip`` seconds below the usual level: the jitter seen is more than
        the margin; cover all of it at once, and at least 1 ms more (≤ +20 ms). One ms per
        underrun learnt a 5 ms jitter with five lost pieces of audio."""
        wider = max(self.target + WIDEN_STEP_S, self.base + dip)
        self.target = min(self.base + WIDEN_MAX_S, wider)
        self.hold = HOLD_S

    def cover(self, dip: float) -> None:
        """A dip of the level ``dip`` seconds below its usual: keep that much above the base."""
        if self.base + dip > self.target:
            self.target = min(self.base + WIDEN_MAX_S, self.base + dip)
            self.hold = HOLD_S

    def relax(self, dt: float, whole: float = 0.0) -> None:
        """An hour without a widening, and the extra margin melts away, 0.1 ms a minute.
        For a card that calls back once a frame, ``whole`` is its period: its audio comes
        a period at a time, so a margin short of a whole period above the base rides no
        missed callback and is only latency; it goes back to the base at once."""
        if self.hold > 0:
            self.hold -= dt
        else:
            self.target = max(self.base, self.target - MELT_PER_MINUTE_S * dt / 60.0)
            if self.target < self.base + whole:
                self.target = self.base

    def update(self, low_water: float, dt: float) -> float:
        """New output/input ratio from this window's low-water mark (seconds)."""
        error = low_water - self.target
        # The integral learns the steady drift from the raw error; the proportional part
        # ignores a level up to the deadband above the target, which is jitter, not drift
        # (every change of ratio bends the audio's timing a little), but never one below
        # it: that is the margin being eaten, and the next late callback runs it dry.
        self.integral = float(
            np.clip(
                self.integral + error * dt / self.ti, -self.limit * self.tau, self.limit * self.tau
            )
        )
        if error > 0:
            error = max(0.0, error - DEADBAND_S)
        step = float(np.clip((error + self.integral) / self.tau, -self.limit, self.limit))
        self.ratio = 1.0 - step
        return self.ratio

    @property
    def ppm(self) -> float:
        return (self.ratio - 1.0) * 1e6


@dataclass
class CardSpec:
    """Which device and how to open it; the card's process finds it afresh at each (re)open."""

    device: str | int  # index, or a piece of the name
    host_api: str | None = None
    sample_rate: int | None = None  # None: the card's default
    input_channels: int = 1  # opened on the device (the radio's channel is one of them)
    output_channels: int = 1
    input_channel: int = 0  # 0-based
    output_channel: int = 0
    blocksize: int = 0  # 0: whatever the audio server's period is (lowest latency)
    latency: float | str = "low"
    margin: float = 0.001  # seconds of low-water each ring keeps for jitter
    max_ppm: float = 500.0

    def request(self, port: str) -> OpenRequest:
        return OpenRequest(
            self.device,
            self.host_api,
            self.input_channels,
            self.output_channels,
            self.input_channel,
            self.output_channel,
            self.sample_rate,
            self.blocksize,
            self.latency,
            jack_client_name(port),
        )


class SoundCard:
    """One radio's card, read and written one engine frame at a time on the tick."""

    def __init__(self, spec: CardSpec, rate: int, frame_samples: int, name: str = "card") -> None:
        self.spec, self.rate, self.n, self.name = spec, rate, frame_samples, name
        self.frame_seconds = frame_samples / rate
        self.up = False
        self.error = ""
        self.lost = False  # down since a loss; cleared (and the port told) when it is back
        self.block = CardBlock()
        self.process = CardProcess(self.block)
        self.device_rate = spec.sample_rate or DEFAULT_RATE
        self.rx_control = DriftControl(spec.margin, max_ppm=spec.max_ppm)
        self.tx_control = DriftControl(spec.margin, max_ppm=spec.max_ppm)
        self._converters(self.device_rate)
        self.rx_buf = np.zeros(0, np.float32)
        self.rx_priming = True
        self.rx_low = math.inf
        self.tx_primed = False
        self.tx_underruns_seen = 0
        self.tx_missing_seen = 0  # TX_MISSING when the FIFO was last primed
        self.last_write = math.inf  # when the tick last wrote (its rhythm shows a late tick)
        self.started_at = -math.inf  # when the stream last started (``START_GRACE_S``)
        self.xruns_seen = 0
        self.last_xrun = -math.inf  # when the tick last saw the xrun count move
        self.alarms: list[Alarm] = []  # underruns and dips not yet blamed
        self.underruns: deque[Underrun] = deque(maxlen=1000)  # the latest, once blamed
        # (tick time, last callback's time, its first frame), one a tick: where the ticks
        # fall in the card's cycle, and the stream against the wall clock
        self.stamps: deque[tuple[float, float, int]] = deque(
            maxlen=max(PHASE_TICKS, round(LAG_KEPT_S / self.frame_seconds))
        )
        self.rx_low_water = self.tx_low_water = 0.0  # the last window's marks (seconds)
        self.rx_lows: deque[float] = deque(maxlen=USUAL_WINDOWS + 2)  # the last windows' marks
        self.tx_lows: deque[float] = deque(maxlen=USUAL_WINDOWS + 2)
        self.now: Callable[[], float] = time.monotonic  # (the drift tests run simulated time)
        self.tx_extra = 0.0  # TX delay held in the ring while keyed (seconds)
        self.tx_quiet = 0  # samples at the ring's tail, written since the last non-silent frame
        self.window_ticks = max(1, round(WINDOW_S / self.frame_seconds))
        self.ticks = 0
        # Counts of streams past (the callback's own counters restart with each process).
        self.counts = {
            "rx_underruns": 0,
            "tx_underruns": 0,
            "underruns_after_xruns": 0,
            "margin_widenings": 0,
            "dropped_samples": 0,
            "xruns": 0,
            "device_errors": 0,
            "reopens": 0,
        }
        self._lock = threading.Lock()
        self._retry: threading.Thread | None = None
        self._closing = threading.Event()
        self.on_state: Callable[[bool, str], None] | None = None

    @property
    def rx(self) -> SharedRing:
        return self.block.rx

    @property
    def tx(self) -> SharedRing:
        return self.block.tx

    @property
    def status(self) -> np.ndarray:
        return self.block.status

    @property
    def period(self) -> int:
        """Frames per callback, as the card last called back with."""
        return int(self.status[FRAMES]) or self.spec.blocksize or DEFAULT_PERIOD

    def _converters(self, device_rate: int) -> None:
        down = min(1.0, self.rate / device_rate)
        self.rx_resampler = SincInterpolator(PASSBAND * down, math.ceil(ZERO_CROSSINGS / down))
        up = min(1.0, device_rate / self.rate)
        self.tx_resampler = SincInterpolator(PASSBAND * up, math.ceil(ZERO_CROSSINGS / up))

    # --- open / close ---------------------------------------------------------

    def open(self) -> None:
        """Start the card's process and stream; raises naming why if the device cannot open."""
        self._closing.clear()
        if self.block.closed:
            self.block = CardBlock()
            self.process = CardProcess(self.block)
        self._started(self.process.start(self.spec.request(self.name)))

    def _started(self, opened: Opened) -> None:
        """The stream runs (on fresh, empty rings): the tick's side starts afresh too."""
        if opened.rate != self.device_rate:
            self.device_rate = opened.rate
            self._converters(opened.rate)
        self.rx_buf = np.zeros(0, np.float32)
        self.rx_priming = True
        self.tx_primed = False
        self.tx_underruns_seen = 0
        self.tx_missing_seen = 0
        self.last_write = math.inf
        self.started_at = self.now()
        self.xruns_seen = 0
        self.tx_extra = 0.0
        self.rx_low = math.inf
        self.rx_lows.clear()
        self.tx_lows.clear()
        self.stamps.clear()
        self.error = ""
        self.up = True
        log.info("%s: sound card open: %s, %d Hz", self.name, opened.card, opened.rate)

    def close(self) -> None:
        self._closing.set()
        self.up = False
        if self._retry is not None and self._retry is not threading.current_thread():
            self._retry.join(timeout=RETRY_MAX_S)
        self.process.stop()
        if not self.block.closed:
            self._keep_counts()
            self.block.close()

    def _keep_counts(self) -> None:
        """Add an ended stream's counters to the card's, before a new one restarts them."""
        s = self.status
        self.counts["xruns"] += int(s[XRUNS])
        self.counts["tx_underruns"] += int(s[TX_UNDERRUNS])
        self.counts["dropped_samples"] += int(s[RX_DROPPED])
        s[XRUNS] = s[TX_UNDERRUNS] = s[RX_DROPPED] = 0

    # --- the tick (engine's thread) ---------------------------------------------

    def check(self) -> bool:
        """Is the card alive? Detects a vanished device and starts reopening it."""
        if not self.up:
            return False
        # Shared memory only, no system call per tick: a process that died stops calling
        # back too, and is asked after only once the callbacks have stopped.
        now = self.now()
        silent = now - float(self.block.clock[0])
        if silent > STALL_S or self.status[FINISHED]:
            if self.status[FINISHED]:
                reason = "stream stopped by the audio system"
            elif not self.process.alive:
                reason = "the card's process ended"
            else:
                reason = f"no audio callbacks for {STALL_S:.1f}s"
            self._lost(reason)
            return False
        frame, when = stamp(self.status, self.block.clock)
        if frame:
            self.stamps.append((now, when, frame))
        xruns = int(self.status[XRUNS])
        if xruns != self.xruns_seen:
            self.xruns_seen, self.last_xrun = xruns, now
        if self.alarms:
            self._blame(now)
        return True

    def _blame(self, now: float) -> None:
        """Widen the margin of a FIFO that ran dry or dipped, unless the audio server lost
        the time or the stream has just started. An xrun alone does not excuse it: one
        whose callbacks came late and caught up lost nothing, and a wider margin rides
        that next time; only stream time lost (half a period or more: a skipped cycle)
        is beyond any margin."""
        waiting = []
        for alarm in self.alarms:
            if now - alarm.when <= XRUN_SHADOW_S:  # an xrun may yet be reported
                waiting.append(alarm)
                continue
            lost = self.stream_lost(alarm.when)
            if (
                self.last_xrun >= alarm.when - alarm.span - XRUN_SHADOW_S
                and lost >= self.half_period
            ):
                cause = "xrun"
            elif alarm.when - self.started_at < START_GRACE_S:
                cause = "start"
            else:
                cause = "margin"
            if cause == "xrun" and alarm.dry:
                self.counts["underruns_after_xruns"] += 1
            if cause == "margin":
                was = alarm.control.target
                if alarm.dry:
                    alarm.control.widen(alarm.dip)
                else:
                    alarm.control.cover(alarm.dip)
                self.counts["margin_widenings"] += alarm.control.target > was
            if not alarm.dry:
                continue
            way = "rx" if alarm.control is self.rx_control else "tx"
            self.underruns.append(Underrun(alarm.when, way, cause, alarm.late, lost))
            if cause == "margin":
                late = "the card's callback" if way == "rx" else "the media tick"
                log.info(
                    "%s: %s underrun, %s came %.1f ms late; margin now %.1f ms",
                    self.name,
                    way,
                    late,
                    alarm.late * 1000,
                    alarm.control.target * 1000,
                )
        self.alarms = waiting

    def stream_lost(self, when: float) -> float:
        """Stream time the audio server lost around ``when``: how much further behind the
        wall clock its punctual callbacks ran after than before (a late callback that caught
        up lost nothing; one the server gave up on did). The least lag of each side is its
        punctual callbacks'; a drift of 500 ppm moves it 1 ms in the 2 s compared."""
        dev = self.device_rate  # (by when each callback ran: a tick in a stall stamps the last)
        before = [at - f / dev for _, at, f in self.stamps if when - LOSS_BEFORE_S <= at < when]
        after = [at - f / dev for _, at, f in self.stamps if when < at <= when + XRUN_SHADOW_S]
        return max(0.0, min(after) - min(before)) if before and after else 0.0

    def _xrun_lost(self) -> float:
        """Stream time lost at the last xrun (half a period or more: a skipped cycle), once
        0.2 s of callbacks after it show it."""
        after = sum(1 for t, _, _ in self.stamps if t > self.last_xrun)
        lost = self.stream_lost(self.last_xrun) if after * self.frame_seconds >= 0.2 else 0.0
        return lost if lost >= self.half_period else 0.0

    @property
    def half_period(self) -> float:
        """Stream time lost this long or more is a skipped cycle, not a clock's wobble."""
        return self.period / self.device_rate / 2

    def tick_phase(self) -> float | None:
        """How far past the middle of the card's cycle the ticks fall (seconds, −period/2 to
        +period/2), or None when that means nothing: the card's period does not divide the
        engine frame (then ticks fall at every point of its cycle in turn), or too few
        ticks were seen.

        With a whole number of periods to a frame every tick falls at the same point of the
        card's cycle, set by chance when the two started. Just after a callback, a callback
        a little late runs receive dry; just before one, a tick a little late runs transmit
        dry; either way the margin must then learn a whole period (20 ms at period 960).
        The middle leaves half a period of lateness either way. The mean is circular: a
        phase that jitters across the cycle's end is one phase, not two that average to
        the middle."""
        cycle = self.period / self.device_rate
        if len(self.stamps) < PHASE_TICKS or not self._frame_is_whole_periods():
            return None
        recent = list(self.stamps)[-PHASE_TICKS:]
        angles = np.array([t - at for t, at, _ in recent]) * (2 * math.pi / cycle)
        mean = math.atan2(float(np.mean(np.sin(angles))), float(np.mean(np.cos(angles))))
        return (mean % (2 * math.pi) - math.pi) * cycle / (2 * math.pi)

    def _frame_is_whole_periods(self) -> bool:
        """Does the card call back a whole number of times per engine frame (960 at 20 ms)?"""
        return bool(self.period) and not (self.n * self.device_rate / self.rate) % self.period

    def quiet(self) -> bool:
        """Is all the audio in both FIFOs silence (between overs)?"""
        return self._rx_quiet() and (not self.tx_primed or self._tx_quiet())

    def _rx_quiet(self) -> bool:
        return float(np.max(np.abs(self.rx_buf), initial=0)) < QUIET

    def _tx_quiet(self) -> bool:
        return self.tx_quiet >= self.tx.queued

    def _pad_rx(self, samples: int) -> None:
        """Silence ahead of the received audio (its FIFO is short between overs)."""
        self.rx_buf = np.concatenate((np.zeros(samples, np.float32), self.rx_buf))

    def _pad_tx(self, samples: int) -> None:
        """Silence after the queued audio (its FIFO is short between overs)."""
        self._push(np.zeros(samples, np.float32))
        self.tx_quiet += samples

    def ticks_moved(self, seconds: float) -> None:
        """The engine's ticks now fall ``seconds`` later (negative: earlier). Between overs
        the FIFO the move leaves short is topped up with that much silence at once (the
        other's excess silence is cut at the window's end, as ever): earlier ticks find
        less received, later ones let the card play more before the next frame. Mid-over
        nothing is inserted: the move is a step of 0.2 ms, which the drift control follows
        as it follows a crystal."""
        if not self.up or not self.quiet():
            return
        if seconds < 0 and not self.rx_priming:
            self._pad_rx(round(-seconds * self.rate))
        elif seconds > 0 and self.tx_primed:
            self._pad_tx(round(seconds * self.device_rate))

    @staticmethod
    def _usual(control: DriftControl, lows: deque[float]) -> float:
        """The FIFO's usual low-water level: the median of the last windows' marks."""
        recent = list(lows)[-USUAL_WINDOWS:]
        return float(np.median(recent)) if recent else control.target

    @staticmethod
    def _short(control: DriftControl, lows: deque[float], low: float) -> bool:
        """Below the margin this window and the last: a margin that widened, not a dip."""
        floor = control.target - TRIM_QUIET_S
        return low < floor and bool(lows) and lows[-1] < floor

    def _watch(self, control: DriftControl, lows: deque[float], low: float, dt: float) -> None:
        """Was the window before this one a dip (see ``DIP_MIN_S``)?"""
        lows.append(low)
        if len(lows) < USUAL_WINDOWS + 2:
            return
        *before, dipped, after = lows
        dip = min(float(np.median(before)), after) - dipped
        if dipped < control.target and dip >= DIP_MIN_S:  # (cover() judges if it is news)
            self.alarms.append(Alarm(self.now() - dt, control, dip, span=dt))

    def read(self) -> np.ndarray | None:
        """One engine frame of received audio, or None (priming, underrun, card down)."""
        if not self.check():
            return None
        dev = self.device_rate
        raw = self.rx.pop_all()
        step = (dev / self.rate) / self.rx_control.ratio
        if len(raw):
            self.rx_buf = np.concatenate((self.rx_buf, self.rx_resampler.process(raw, step)))
        n = self.n
        target = round(self.rx_control.target * self.rate)
        level = len(self.rx_buf)
        period = self.period * self.rate // dev
        if level > n + target + period + STALE_S * self.rate:  # engine stalled: drop stale audio
            cut = level - n - target - period
            self.rx_buf = self.rx_buf[cut:]
            self.counts["dropped_samples"] += cut
            level -= cut
        if self.rx_priming:
            if level < n + target:
                return None
            self.rx_priming = False
        if level < n:
            self.counts["rx_underruns"] += 1
            dip = self._usual(self.rx_control, self.rx_lows) + (n - level) / self.rate
            now = self.now()
            late = now - float(self.block.clock[0]) - self.period / dev  # the card's
            self.alarms.append(Alarm(now, self.rx_control, dip, dry=True, late=max(0.0, late)))
            self.rx_priming = True
            return None
        frame = self.rx_buf[:n]
        self.rx_buf = self.rx_buf[n:]
        self.rx_low = min(self.rx_low, len(self.rx_buf))
        self._end_of_tick()
        return frame

    def write(self, frame: np.ndarray | None) -> None:
        """One engine frame to transmit (None: silence). Always call once per tick."""
        if not self.up:
            return
        dev = self.device_rate
        if frame is None:
            frame = np.zeros(self.n, np.float32)
        now = self.now()
        gap, self.last_write = now - self.last_write, now
        underruns = int(self.status[TX_UNDERRUNS])
        if underruns > self.tx_underruns_seen:  # the card ran dry: prime again
            self.tx_underruns_seen = underruns
            missing = int(self.status[TX_MISSING]) - self.tx_missing_seen  # silence it played
            dip = self._usual(self.tx_control, self.tx_lows) + missing / dev
            late = max(0.0, gap - self.frame_seconds)  # the tick's, against the one before
            self.alarms.append(Alarm(now, self.tx_control, dip, dry=True, late=late))
            self.tx_primed = False
        if not self.tx_primed:
            # Start (or restart after an underrun) so that the level is at the target just
            # before a frame arrives, when the card has taken the most whole periods it can
            # between two frames: ceil(frame / period) periods, i.e. this slack more.
            slack = -round(self.n * dev / self.rate) % self.period
            want = round((self.tx_control.target + self.tx_extra) * dev) + slack
            self._push(np.zeros(max(0, want - self.tx.queued), np.float32))
            self.tx_primed = True
            self.tx_missing_seen = int(self.status[TX_MISSING])
        else:
            # Frames bunched up after an engine stall would sit in the ring as latency for
            # seconds: anything 30 ms beyond target + one period is dropped now.
            limit = round((self.tx_control.target + self.tx_extra + STALE_TX_S) * dev) + self.period
            if self.tx.queued > limit:
                self._skip_tx(self.tx.queued - limit)
        step = (self.rate / dev) / self.tx_control.ratio
        out = self.tx_resampler.process(frame, step)
        self._push(out)
        self.tx_quiet = self.tx_quiet + len(out) if float(np.max(np.abs(frame))) < QUIET else 0

    def _push(self, x: np.ndarray) -> None:
        self.counts["dropped_samples"] += self.tx.push(x)

    def _skip_tx(self, n: int) -> None:
        self.tx.ask_skip(n)
        self.counts["dropped_samples"] += n

    def _end_of_tick(self) -> None:
        self.ticks += 1
        if self.ticks % self.window_ticks:
            return
        dt = self.window_ticks * self.frame_seconds
        whole = self.period / self.device_rate if self._frame_is_whole_periods() else 0.0
        self.rx_control.relax(dt, whole)
        self.tx_control.relax(dt, whole)
        # An audio-server xrun (in this window or the last) that skipped cycles left the
        # FIFOs off by the stream time lost: transmit audio the card never played waits as
        # that much more latency, and receive audio it never recorded is missing from the
        # margin. The audio glitched there already, so both are put right at once, even
        # mid-over, not over the seconds the control takes (0.5 ms a second at most), with
        # the margin eaten meanwhile. Only what the stream clock shows lost: a late callback
        # that caught up lost nothing, and a cut or silence for it would be a glitch where
        # there was none.
        lost = self._xrun_lost() if self.now() - self.last_xrun < 2 * dt else 0.0
        if math.isfinite(self.rx_low):
            low = self.rx_low_water = self.rx_low / self.rate
            excess = low - self.rx_control.target
            cut = round(excess * self.rate)
            if excess > TRIM_S or (
                excess > TRIM_QUIET_S and float(np.max(np.abs(self.rx_buf[:cut]))) < QUIET
            ):
                self.rx_buf = self.rx_buf[cut:]  # a stall, or silence: cut at once
                self.counts["dropped_samples"] += cut
            elif excess < -TRIM_QUIET_S and lost:
                self._pad_rx(round(min(-excess, lost) * self.rate))
            elif self._short(self.rx_control, self.rx_lows, low) and self._rx_quiet():
                self._watch(self.rx_control, self.rx_lows, low, dt)
                self._pad_rx(-cut)
            else:
                self.rx_control.update(low, dt)
                self._watch(self.rx_control, self.rx_lows, low, dt)
        self.rx_low = math.inf
        # The callback's least playback level over this window, if it played in it.
        s = self.status
        window = int(s[WINDOW])
        s[WINDOW] = window + 1
        if (
            s[TX_LOW_WINDOW] == window
            and self.tx_primed
            and s[TX_UNDERRUNS] == self.tx_underruns_seen
        ):
            low = self.tx_low_water = int(s[TX_LOW]) / self.device_rate - self.tx_extra
            excess = low - self.tx_control.target
            quiet = self._tx_quiet()
            if excess > TRIM_S or (excess > TRIM_QUIET_S and not self.tx_extra and quiet):
                self._skip_tx(round(excess * self.device_rate))
            elif excess > TRIM_QUIET_S and not self.tx_extra and lost:
                self._skip_tx(round(min(excess, lost) * self.device_rate))
            elif self._short(self.tx_control, self.tx_lows, low) and not self.tx_extra and quiet:
                self._watch(self.tx_control, self.tx_lows, low, dt)
                self._pad_tx(round(-excess * self.device_rate))
            else:
                self.tx_control.update(low, dt)
                self._watch(self.tx_control, self.tx_lows, low, dt)

    # --- TX delay --------------------------------------------------------------

    def hold_tx(self, seconds: float) -> None:
        """TX delay: put ``seconds`` of silence ahead of the audio (PTT is already up)."""
        if seconds <= 0 or not self.up:
            return
        # Silence after what is queued (the tail of the previous, unkeyed, silence).
        self._push(np.zeros(round(seconds * self.device_rate), np.float32))
        self.tx_extra = seconds

    def release_tx(self) -> None:
        """PTT is down: drop the TX-delay silence still queued, back to the normal level."""
        extra, self.tx_extra = self.tx_extra, 0.0
        if extra > 0:
            self.tx.ask_skip(min(self.tx.queued, round(extra * self.device_rate)))

    def queued_seconds(self) -> float:
        """How long until the audio written last has left the card."""
        return self.tx.queued / self.device_rate

    # --- health ---------------------------------------------------------------

    def _lost(self, reason: str) -> None:
        self.up = False
        self.lost = True
        self.error = reason
        self.counts["device_errors"] += 1
        log.warning("%s: sound card lost (%s); reopening with backoff", self.name, reason)
        if self.on_state:
            self.on_state(False, reason)
        if self._retry is None or not self._retry.is_alive():
            self._retry = threading.Thread(
                target=self._reopen, daemon=True, name=f"reopen-{self.name}"
            )
            self._retry.start()

    def _reopen(self) -> None:
        self.process.kill()  # a stream stuck in a dead server is never waited for
        self._keep_counts()
        wait = RETRY_FIRST_S
        while not self._closing.wait(wait):
            try:
                opened = self.process.start(self.spec.request(self.name))
            except (OSError, LookupError) as exc:
                log.info("%s: sound card not back yet: %s", self.name, exc)
                wait = min(RETRY_MAX_S, wait * 2)
                continue
            if self._closing.is_set():
                self.process.stop()  # close() came while this one was starting
                return
            self._started(opened)
            self._back()
            return

    def _back(self) -> None:
        """The card is open again after a loss: count, log and tell the port, once per loss."""
        with self._lock:
            if not self.lost:
                return
            self.lost = False
        self.counts["reopens"] += 1
        log.warning("%s: sound card is back", self.name)
        if self.on_state:
            self.on_state(True, "reopened")

    def stats(self) -> dict[str, float]:
        counts = dict(self.counts)
        queued = 0
        if not self.block.closed:  # the running stream's own counts, not yet kept
            s = self.status
            counts["xruns"] += int(s[XRUNS])
            counts["tx_underruns"] += int(s[TX_UNDERRUNS])
            counts["dropped_samples"] += int(s[RX_DROPPED])
            queued = self.tx.queued
        return {
            **{k: float(v) for k, v in counts.items()},
            "device_up": float(self.up),
            "rx_ratio_ppm": self.rx_control.ppm,
            "tx_ratio_ppm": self.tx_control.ppm,
            "rx_buffer_seconds": len(self.rx_buf) / self.rate,
            "tx_buffer_seconds": queued / self.device_rate,
            "rx_low_water_seconds": self.rx_low_water,
            "tx_low_water_seconds": self.tx_low_water,
            "rx_margin_seconds": self.rx_control.target,
            "tx_margin_seconds": self.tx_control.target,
        }
