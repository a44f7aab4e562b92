"""A radio's sound card: PortAudio callback stream ↔ engine frames, with the card's clock absorbed.

The card runs on its own crystal and its own callback thread; the engine ticks on
its own clock. Between them sits one small FIFO per direction, and no fixed
large buffer. Each direction's *low-water mark* (the least audio the FIFO held
over the last half second, i.e. how close it came to running dry) is steered to
a small margin by a PI control of a fine resampling ratio (± ``max_ppm``), so
over hours the FIFO neither underruns nor grows, and latency stays at what the
jitter actually seen needs. Rate conversion and drift correction are one
windowed-sinc stage per direction (1.5 ms each), from ``codecs.interp``.

Gross errors are corrected at once and counted: an underrun re-primes the FIFO
(silence), a FIFO far above target (the engine stalled) is trimmed.

A card that stops calling back (unplugged, audio server gone) is reported by
:attr:`SoundCard.up` going False; it is reopened with backoff on a thread of its
own, and resumes when the device is back — if PortAudio must be renewed to see it
(a replugged card, a restarted JACK server), every card in the process reopens on
the renewed PortAudio and rides through the gap on its FIFOs (see ``portaudio``).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gateway.codecs.interp import SincInterpolator

from . import portaudio as pa
from .devices import Card

log = logging.getLogger(__name__)

WINDOW_S = 0.5  # low-water marks are taken over this long
STALL_S = 0.3  # no callback for this long (≫ any period): the card is gone
SWITCH_INTERVAL_S = 0.0005
DEADBAND_S = 0.0015
WIDEN_STEP_S = 0.001
WIDEN_MAX_S = 0.020
TRIM_S = 0.010  # a low-water mark this far above target (a stall, a burst) is cut at once
# …and only this far while what would be cut is silence (between overs, at start): the
# PI control moves at most max_ppm (0.5 ms a second at 500 ppm), so a few ms of excess
# would otherwise sit as latency for seconds; cutting silence is inaudible.
TRIM_QUIET_S = 0.0005
QUIET = 10 ** (-50 / 20)  # peak level below which audio counts as silence
STALE_S = 0.03  # received audio this far beyond target after a stall is dropped at once
STALE_TX_S = 0.03  # likewise for audio queued to the card
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
PROBE_MAX_S = 10.0  # a vanished device is looked for at least this often
CLOSE_WAIT_S = 2.0  # a stream that takes longer to stop is stuck in PortAudio: abandoned
# Rate conversion kernel: 8 zero crossings of the narrower band, pass band to 75 % of its
# Nyquist (flat to 4 kHz at 16 kHz, −6 dB at 6 kHz; ≥ 72 dB alias/image rejection). A radio's
# own audio is 300–3000 Hz, so a 24-crossing, 90 % kernel (1.5 ms each way) bought nothing
# but 2 ms of radio→radio latency; this one holds 0.5 ms each way.
ZERO_CROSSINGS = 8
PASSBAND = 0.75


class Fifo:
    """Float32 ring shared by the PortAudio callback and the tick; short lock, no allocation."""

    def __init__(self, capacity: int) -> None:
        self.buf = np.zeros(capacity, np.float32)
        self.read_at = 0
        self.level = 0
        self.lock = threading.Lock()

    def push(self, x: np.ndarray) -> int:
        """Append; returns how many of the oldest samples had to be dropped to make room."""
        with self.lock:
            n, cap = len(x), len(self.buf)
            dropped = max(0, self.level + n - cap)
            if dropped:
                self.read_at = (self.read_at + dropped) % cap
                self.level -= dropped
                if n > cap:
                    x = x[-cap:]
                    n = cap
            start = (self.read_at + self.level) % cap
            first = min(n, cap - start)
            self.buf[start : start + first] = x[:first]
            self.buf[: n - first] = x[first:]
            self.level += n
            return dropped

    def pop_into(self, out: np.ndarray) -> int:
        """Fill ``out`` from the front; returns how many samples were there."""
        with self.lock:
            n = min(len(out), self.level)
            cap = len(self.buf)
            first = min(n, cap - self.read_at)
            out[:first] = self.buf[self.read_at : self.read_at + first]
            out[first:n] = self.buf[: n - first]
            self.read_at = (self.read_at + n) % cap
            self.level -= n
            return n

    def pop_all(self) -> np.ndarray:
        out = np.empty(self.level, np.float32)
        got = self.pop_into(out)
        return out[:got]

    def discard(self, n: int) -> int:
        with self.lock:
            n = max(0, min(n, self.level))
            self.read_at = (self.read_at + n) % len(self.buf)
            self.level -= n
            return n

    def clear(self) -> None:
        with self.lock:
            self.read_at = self.level = 0


class DriftControl:
    """PI control of a resampling ratio that holds a FIFO's low-water mark at ``target``.

    ``tau``: seconds to correct an error at the proportional rate (a 1 ms error at
    tau 8 s is 125 ppm); ``ti``: integral time, which learns the steady drift.
    The target itself adapts: each underrun adds 1 ms (the jitter is worse than
    the margin allowed for), and the extra melts away at 1 ms a minute.
    """

    def __init__(self, target: float, tau: float = 8.0, ti: float = 15.0, max_ppm: float = 500.0):
        self.target, self.tau, self.ti = target, tau, ti
        self.base = target
        self.limit = max_ppm * 1e-6
        self.integral = 0.0
        self.ratio = 1.0

    def widen(self) -> None:
        """An underrun: the jitter seen is more than the margin; keep 1 ms more (≤ +20 ms)."""
        self.target = min(self.base + WIDEN_MAX_S, self.target + WIDEN_STEP_S)

    def relax(self, dt: float) -> None:
        """Without underruns the extra margin melts away, 1 ms a minute."""
        self.target = max(self.base, self.target - WIDEN_STEP_S * dt / 60.0)

    def update(self, low_water: float, dt: float) -> float:
        """New output/input ratio from this window's low-water mark (seconds)."""
        error = low_water - self.target
        # The integral learns the steady drift from the raw error; the proportional part
        # ignores errors within the deadband, which are jitter, not drift (every change of
        # ratio bends the audio's timing a little).
        self.integral = float(np.clip(self.integral + error * dt / self.ti, -self.limit * self.tau,
                                      self.limit * self.tau))  # fmt: skip
        deadband = min(DEADBAND_S, self.target / 2)  # never let jitter eat the whole margin
        error = float(np.sign(error)) * max(0.0, abs(error) - deadband)
        step = float(np.clip((error + self.integral) / self.tau, -self.limit, self.limit))
        self.ratio = 1.0 - step
        return self.ratio

    @property
    def ppm(self) -> float:
        return (self.ratio - 1.0) * 1e6


@dataclass
class CardSpec:
    """Which device and how to open it; ``resolve`` finds the PortAudio index each (re)open."""

    resolve: Callable[[], int]
    device_rate: int
    # Is the device in this list (a child process's scan)? None: any non-empty list will do.
    find: Callable[[list[Card]], object] | None = None
    input_channels: int = 1  # opened on the device (the radio's channel is one of them)
    output_channels: int = 1
    input_channel: int = 0  # 0-based
    output_channel: int = 0
    blocksize: int = 0  # 0: whatever the audio server's period is (lowest latency)
    latency: float | str = "low"
    margin: float = 0.001  # seconds of low-water each FIFO keeps for jitter
    max_ppm: float = 500.0


class SoundCard:
    """Duplex callback stream for one radio, read and written one engine frame at a time."""

    def __init__(self, spec: CardSpec, rate: int, frame_samples: int, name: str = "card") -> None:
        self.spec, self.rate, self.n, self.name = spec, rate, frame_samples, name
        self.frame_seconds = frame_samples / rate
        dev = spec.device_rate
        self.up = False
        self.error = ""
        self.stream: Any = None
        self.generation = pa.generation  # the PortAudio instance the stream belongs to
        self.renewing = False  # PortAudio is being renewed under this card: a gap, not a loss
        self.lost = False  # down since a loss; cleared (and the port told) when it is back
        self.rx = Fifo(dev)  # one second of room
        self.tx = Fifo(dev)
        self.rx_control = DriftControl(spec.margin, max_ppm=spec.max_ppm)
        self.tx_control = DriftControl(spec.margin, max_ppm=spec.max_ppm)
        down = min(1.0, rate / dev)
        self.rx_resampler = SincInterpolator(PASSBAND * down, math.ceil(ZERO_CROSSINGS / down))
        up = min(1.0, dev / rate)
        self.tx_resampler = SincInterpolator(PASSBAND * up, math.ceil(ZERO_CROSSINGS / up))
        self.rx_buf = np.zeros(0, np.float32)
        self.rx_priming = True
        self.rx_low = math.inf
        self.tx_primed = False
        self.tx_underruns_seen = 0
        self.tx_low = math.inf  # written by the callback
        self.tx_extra = 0.0  # TX delay held in the FIFO while keyed (seconds)
        self.tx_quiet = 0  # samples at the FIFO's tail, written since the last non-silent frame
        self.window_ticks = max(1, round(WINDOW_S / self.frame_seconds))
        self.ticks = 0
        self.last_callback = 0.0
        self.counts = {"rx_underruns": 0, "tx_underruns": 0, "dropped_samples": 0, "xruns": 0,
                       "device_errors": 0, "reopens": 0}  # fmt: skip
        self._lock = threading.Lock()
        self._retry: threading.Thread | None = None
        self._closing = threading.Event()
        self._out_scratch = np.zeros(0, np.float32)
        self.on_state: Callable[[bool, str], None] | None = None
        self.serial = next(_SERIALS)  # streams reopen in the order the cards were made
        _REGISTRY.add(self)

    # --- open / close ---------------------------------------------------------

    def open(self) -> None:
        """Open and start the stream; raises with a clear reason if the device cannot open."""
        # PortAudio calls back on the audio server's realtime thread, which must take the
        # GIL within a fraction of a period; Python's default 5 ms switch interval is a
        # whole period at 256 frames and makes the server drop cycles (xruns).
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._closing.clear()
        self._start_stream()

    def _start_stream(self) -> None:
        import sounddevice as sd

        _hook_exit()

        spec = self.spec
        with pa.LOCK:  # PortAudio is not thread-safe: one open at a time (and never mid-renewal)
            self._open_locked(sd, spec)

    def _open_locked(self, sd: Any, spec: CardSpec) -> None:
        index = spec.resolve()
        try:
            stream = sd.Stream(
                device=(index, index),
                samplerate=spec.device_rate,
                channels=(spec.input_channels, spec.output_channels),
                dtype="float32",
                blocksize=spec.blocksize,
                latency=spec.latency,
                callback=self._callback,
                finished_callback=self._finished,
            )
        except sd.PortAudioError as exc:
            why = _reason(exc, spec)
            raise OSError(f"sound card {index} ({self.name}): cannot open: {why}") from exc
        self._reset_paths()
        self.last_callback = time.monotonic()
        stream.start()
        self.generation = pa.generation
        self.stream = stream
        self.up = True
        self.error = ""
        pa.remember_client_name()

    def _reset_paths(self) -> None:
        self.rx.clear()
        self.tx.clear()
        self.rx_buf = np.zeros(0, np.float32)
        self.rx_priming = True
        self.tx_primed = False
        self.rx_low = self.tx_low = math.inf

    def close(self) -> None:
        self._closing.set()
        self.up = False
        stream, self.stream = self.stream, None
        if stream is not None:
            _close_stream(stream, self.generation)
        if self._retry is not None and self._retry is not threading.current_thread():
            self._retry.join(timeout=2.0)

    # --- the callback (PortAudio's thread) -------------------------------------

    def _callback(
        self, indata: np.ndarray, outdata: np.ndarray, frames: int, _t: Any, status: Any
    ) -> None:
        self.last_callback = time.monotonic()
        if status:
            self.counts["xruns"] += 1
        try:
            self.rx.push(indata[:, self.spec.input_channel])
            if len(self._out_scratch) != frames:
                self._out_scratch = np.zeros(frames, np.float32)
            out = self._out_scratch
            got = self.tx.pop_into(out)
            if got < frames:
                out[got:] = 0.0
                if self.tx_primed:
                    self.counts["tx_underruns"] += 1
                    self.tx_primed = False
            else:
                self.tx_low = min(self.tx_low, self.tx.level)
            outdata.fill(0.0)
            outdata[:, self.spec.output_channel] = out
        except Exception as exc:  # never let PortAudio abort the stream on our bug
            outdata.fill(0.0)
            self.error = f"callback error: {exc!r}"

    def _finished(self) -> None:
        if not self._closing.is_set():
            self.error = self.error or "stream stopped by the audio system"

    # --- the tick (engine's thread) ---------------------------------------------

    def check(self) -> bool:
        """Is the card alive? Detects a vanished device and starts reopening it."""
        if not self.up or self.renewing:
            return False
        stream = self.stream
        stalled = time.monotonic() - self.last_callback > STALL_S
        if stalled or (stream is not None and not stream.active) or self.error:
            silent = f"no audio callbacks for {STALL_S:.1f}s"
            reason = self.error or (silent if stalled else "stream stopped")
            self._lost(reason)
            return False
        return True

    def read(self) -> np.ndarray | None:
        """One engine frame of received audio, or None (priming, underrun, card down)."""
        if not self.check():
            return None
        dev = self.spec.device_rate
        raw = self.rx.pop_all()
        step = (dev / self.rate) / self.rx_control.ratio
        if len(raw):
            self.rx_buf = np.concatenate((self.rx_buf, self.rx_resampler.process(raw, step)))
        n = self.n
        target = round(self.rx_control.target * self.rate)
        level = len(self.rx_buf)
        period = (self.spec.blocksize or self._period_guess()) * self.rate // dev
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
            self.rx_control.widen()
            self.rx_priming = True
            return None
        frame = self.rx_buf[:n]
        self.rx_buf = self.rx_buf[n:]
        self.rx_low = min(self.rx_low, len(self.rx_buf))
        self._end_of_tick()
        return frame

    def write(self, frame: np.ndarray | None) -> None:
        """One engine frame to transmit (None: silence). Always call once per tick."""
        if not self.up or self.renewing:
            return
        dev = self.spec.device_rate
        if frame is None:
            frame = np.zeros(self.n, np.float32)
        if not self.tx_primed:
            if self.counts["tx_underruns"] > self.tx_underruns_seen:
                self.tx_underruns_seen = self.counts["tx_underruns"]
                self.tx_control.widen()
            # Start (or restart after an underrun) at the target level plus one period.
            period = self.spec.blocksize or self._period_guess()
            want = round((self.tx_control.target + self.tx_extra) * dev) + period
            self.tx.push(np.zeros(max(0, want - self.tx.level), np.float32))
            self.tx_low = math.inf
            self.tx_primed = True
        else:
            # Frames bunched up after an engine stall would sit in the FIFO as latency for
            # seconds: anything 30 ms beyond target + one period is dropped now.
            period = self.spec.blocksize or self._period_guess()
            limit = round((self.tx_control.target + self.tx_extra + STALE_TX_S) * dev) + period
            if self.tx.level > limit:
                self.counts["dropped_samples"] += self.tx.discard(self.tx.level - limit)
        step = (self.rate / dev) / self.tx_control.ratio
        out = self.tx_resampler.process(frame, step)
        self.counts["dropped_samples"] += self.tx.push(out)
        self.tx_quiet = self.tx_quiet + len(out) if float(np.max(np.abs(frame))) < QUIET else 0

    def _period_guess(self) -> int:
        latency = getattr(self.stream, "latency", (0.0, 0.0))
        out_latency = latency[1] if isinstance(latency, tuple) else float(latency)
        return max(64, round(out_latency * self.spec.device_rate))

    def _end_of_tick(self) -> None:
        self.ticks += 1
        if self.ticks % self.window_ticks:
            return
        dt = self.window_ticks * self.frame_seconds
        self.rx_control.relax(dt)
        self.tx_control.relax(dt)
        if math.isfinite(self.rx_low):
            low = self.rx_low / self.rate
            excess = low - self.rx_control.target
            cut = round(excess * self.rate)
            if excess > TRIM_S or (excess > TRIM_QUIET_S
                                   and float(np.max(np.abs(self.rx_buf[:cut]))) < QUIET):
                self.rx_buf = self.rx_buf[cut:]  # a stall, or silence: cut at once
                self.counts["dropped_samples"] += cut
            else:
                self.rx_control.update(low, dt)
        tx_low = self.tx_low
        self.tx_low = math.inf
        if math.isfinite(tx_low) and self.tx_primed:
            low = tx_low / self.spec.device_rate - self.tx_extra
            excess = low - self.tx_control.target
            quiet = not self.tx_extra and self.tx_quiet >= self.tx.level
            if excess > TRIM_S or (excess > TRIM_QUIET_S and quiet):
                cut = round(excess * self.spec.device_rate)
                self.counts["dropped_samples"] += self.tx.discard(cut)
            else:
                self.tx_control.update(low, dt)
        self.rx_low = math.inf

    # --- TX delay --------------------------------------------------------------

    def hold_tx(self, seconds: float) -> None:
        """TX delay: put ``seconds`` of silence ahead of the audio (PTT is already up)."""
        if seconds <= 0 or not self.up:
            return
        self._insert_front_silence(seconds)
        self.tx_extra = seconds

    def _insert_front_silence(self, seconds: float) -> None:
        # Silence after what is queued (the tail of the previous, unkeyed, silence).
        self.tx.push(np.zeros(round(seconds * self.spec.device_rate), np.float32))

    def release_tx(self) -> None:
        """PTT is down: drop the TX-delay silence still queued, back to the normal level."""
        extra, self.tx_extra = self.tx_extra, 0.0
        if extra > 0:
            self.tx.discard(round(extra * self.spec.device_rate))

    def queued_seconds(self) -> float:
        """How long until the audio written last has left the card."""
        return self.tx.level / self.spec.device_rate

    # --- health ---------------------------------------------------------------

    def _lost(self, reason: str) -> None:
        self.up = False
        self.lost = True
        self.counts["device_errors"] += 1
        log.warning("%s: sound card lost (%s); reopening with backoff", self.name, reason)
        if self.on_state:
            self.on_state(False, reason)
        stream, self.stream = self.stream, None
        if self._retry is None or not self._retry.is_alive():
            self._retry = threading.Thread(target=self._reopen, args=(stream,), daemon=True,
                                           name=f"reopen-{self.name}")  # fmt: skip
            self._retry.start()

    def _reopen(self, dead: Any) -> None:
        if dead is not None:
            _close_stream(dead, self.generation, CLOSE_WAIT_S)
        wait = RETRY_FIRST_S
        while not self._closing.wait(wait):
            try:
                self._resume()
            except Exception as exc:
                self.error = ""
                log.info("%s: sound card not back yet: %s", self.name, exc)
                wait = min(RETRY_MAX_S, PROBE_MAX_S, wait * 2)
                continue
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

    def _resume(self) -> None:
        """Reopen; if this PortAudio cannot (stale device list, dead JACK client), renew it
        once the device shows up in a child process's scan."""
        if self.stream is not None and self.up:
            return  # a renewal (another card's) has reopened this one already
        seen = pa.generation
        if not pa.broken(seen):
            try:
                self._start_stream()
                return
            except (OSError, LookupError):
                pass  # maybe only a rescan finds it: ask a child process
        cards = pa.probe()
        if cards is None or not self._listed(cards):
            raise OSError("the device is not there yet (no fresh scan lists it)")
        _renew(seen)
        if self.stream is None:
            self._start_stream()

    def _listed(self, cards: list[Card]) -> bool:
        if self.spec.find is None:
            return bool(cards)
        try:
            self.spec.find(cards)
        except LookupError:
            return False
        return True

    def stats(self) -> dict[str, float]:
        return {
            **{k: float(v) for k, v in self.counts.items()},
            "device_up": float(self.up),
            "rx_ratio_ppm": self.rx_control.ppm,
            "tx_ratio_ppm": self.tx_control.ppm,
            "rx_buffer_seconds": len(self.rx_buf) / self.rate,
            "tx_buffer_seconds": self.tx.level / self.spec.device_rate,
            "rx_margin_seconds": self.rx_control.target,
            "tx_margin_seconds": self.tx_control.target,
            "portaudio_renewals": float(pa.counts["renewals"]),
        }


_REGISTRY: weakref.WeakSet[SoundCard] = weakref.WeakSet()
_SERIALS = itertools.count()


def _close_stream(stream: Any, generation: int, wait: float = CLOSE_WAIT_S) -> bool:
    """Stop and close on a helper thread: PortAudio can block for minutes when the audio
    server died under the stream. False: it did not stop in time and is abandoned."""
    done = threading.Event()
    abandoned = threading.Event()

    def close() -> None:
        try:
            stream.abort(ignore_errors=True)
            if not abandoned.is_set():  # a late return must not free what is abandoned
                stream.close(ignore_errors=True)
        except Exception:
            pass
        done.set()

    threading.Thread(target=close, daemon=True, name="close-stream").start()
    if done.wait(wait):
        return True
    abandoned.set()
    pa.abandon(stream, generation)
    log.warning("a sound card stream is stuck in PortAudio; abandoned (PortAudio will be renewed)")
    return False


def _renew(seen: int) -> None:
    """Renew PortAudio once for the process, if nobody did since ``seen``: every card whose
    stream belongs to the old instance is stopped, and every card is (re)opened on the new
    one at once, in the order the cards were made — so with JACK, ``in_0, in_1, …`` name
    the same radios as before."""
    with pa.LOCK:
        if pa.generation != seen:
            return  # another card's thread did it already
        cards = sorted((c for c in list(_REGISTRY) if not c._closing.is_set()),
                       key=lambda c: c.serial)  # fmt: skip
        for card in cards:
            card.renewing = True
            stream, card.stream = card.stream, None
            if stream is not None and card.generation == seen:
                _close_stream(stream, seen)
        try:
            pa.reinitialise()
        finally:
            for card in cards:
                was_up = card.up
                try:
                    card._start_stream()
                except Exception as exc:
                    card.renewing = False
                    if was_up:
                        card._lost(f"did not reopen after PortAudio was renewed: {exc}")
                    continue
                card.renewing = False
                card._back()  # a card that was down is back now, not when its thread wakes


_EXIT_HOOKED: list[bool] = []


def _hook_exit() -> None:
    """Register after sounddevice's own exit handler, so this one runs first."""
    if not _EXIT_HOOKED:
        _EXIT_HOOKED.append(True)
        atexit.register(pa.skip_terminate_at_exit)


def _reason(exc: Exception, spec: CardSpec) -> str:
    text = str(exc)
    if "-9997" in text or "Invalid sample rate" in text:
        return (f"{spec.device_rate} Hz is not a rate this device runs at (with JACK the rate is "
                f"the server's); set sample_rate to one it supports")  # fmt: skip
    if "-9985" in text or "busy" in text.lower() or "unavailable" in text.lower():
        return "the device is busy (another program has it open); close it or pick another card"
    if "-9998" in text or "Invalid number of channels" in text:
        return (f"the device has fewer channels than asked for "
                f"(in {spec.input_channels}, out {spec.output_channels})")  # fmt: skip
    return text

