"""PTT: keyers for each kind of line, and the controller that never leaves a transmitter up.

The engine decides *when* a radio should transmit (its mix is audible, plus the
port's ``ptt_hang_time``). This module decides whether the line may follow:

- the **transmit TOT** runs on its own thread, so a stalled event loop or a
  wedged tick cannot hold a transmitter keyed past it;
- a **watchdog** drops PTT when nobody has fed the transmitter audio for
  ``stall`` seconds (the engine is hung, a thread died);
- **release after drain**: an unkey waits only for the audio already queued in
  the sound card to go out, so the tail of an over is not clipped — and no more;
- a keyer whose device vanished is reopened with backoff and resumes;
- an ``atexit`` hook (and SIGTERM turned into a normal exit when nobody else
  handles it) unkeys every live transmitter as the last resort.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import threading
import time
import weakref

from .lines import Cm108, GpioLine, LineError, SerialLines

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0


class Keyer:
    """A radio keyed by its own VOX (``type = "none"``): nothing to drive."""

    description = "none (VOX-keyed radio)"

    def open(self) -> None:
        """Acquire the line and set it to *unkeyed*."""

    def set(self, on: bool) -> None:
        """Drive the PTT line. Raises OSError when the device has gone."""

    def close(self) -> None:
        """Unkey (best effort) and release the device."""

    def fail(self) -> None:
        """Forget a dead device handle so :meth:`open` starts afresh."""
        self.close()

    def present(self) -> bool:
        return True


class SerialKeyer(Keyer):
    """PTT on a serial port's RTS or DTR (a transistor or opto on the line)."""

    def __init__(self, device: str, line: str = "rts", invert: bool = False) -> None:
        self.line, self.invert = line, invert
        self.lines = SerialLines(device, idle={line: invert})
        self.description = f"serial {device} {line.upper()}{' inverted' if invert else ''}"

    def open(self) -> None:
        self.lines.open()
        self.lines.set(self.line, self.invert)

    def set(self, on: bool) -> None:
        self.lines.set(self.line, on != self.invert)

    def close(self) -> None:
        try:
            if self.lines.port is not None:
                self.lines.set(self.line, self.invert)
        except OSError:
            pass
        self.lines.close()

    def fail(self) -> None:
        self.lines.fail()

    def present(self) -> bool:
        return self.lines.present()


class Cm108Keyer(Keyer):
    """PTT on a CM108/CM119 fob's GPIO pin (GPIO3 on most), through /dev/hidrawN."""

    def __init__(self, device: str, gpio: int = 3, invert: bool = False) -> None:
        Cm108.report(gpio, False)  # validates the pin number now, not at first key-up
        self.gpio, self.invert = gpio, invert
        self.hid = Cm108(device)
        self.description = f"CM108 {device} GPIO{gpio}{' inverted' if invert else ''}"

    def open(self) -> None:
        self.hid.open()
        self.hid.set(self.gpio, self.invert)

    def set(self, on: bool) -> None:
        self.hid.set(self.gpio, on != self.invert)

    def close(self) -> None:
        try:
            if self.hid.fd is not None:
                self.hid.set(self.gpio, self.invert)
        except OSError:
            pass
        self.hid.close()

    def fail(self) -> None:
        self.hid.fail()

    def present(self) -> bool:
        return self.hid.present()


class GpioKeyer(Keyer):
    """PTT on a Linux GPIO line (``/dev/gpiochipN``, line offset), e.g. a Raspberry Pi pin."""

    def __init__(self, chip: str, line: int, invert: bool = False) -> None:
        self.invert = invert
        self.gpio = GpioLine(chip, line, output=True, idle=invert)
        self.description = f"GPIO {chip} line {line}{' inverted' if invert else ''}"

    def open(self) -> None:
        self.gpio.open()
        self.gpio.set(self.invert)

    def set(self, on: bool) -> None:
        self.gpio.set(on != self.invert)

    def close(self) -> None:
        try:
            if self.gpio.request is not None:
                self.gpio.set(self.invert)
        except OSError:
            pass
        self.gpio.close()

    def present(self) -> bool:
        return self.gpio.present()


_LIVE: weakref.WeakSet[PttController] = weakref.WeakSet()
_HOOKED = False


def release_all() -> None:
    """Unkey every live transmitter now (atexit, fatal errors)."""
    for controller in list(_LIVE):
        controller.force_off("process exit")


def _sigterm_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _install_last_resort() -> None:
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    atexit.register(release_all)
    # The default SIGTERM action kills the process without atexit; make it a normal
    # exit when nobody (the gateway's own loop, say) has claimed the signal.
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _sigterm_exit)
        except ValueError:
            pass


class PttController:
    """One transmitter's PTT: what the engine wants, and what the line may do.

    ``tot``: transmit time-out (0 = off); after it trips the line stays down until
    the engine unkeys and keys again. ``stall``: watchdog, seconds without
    :meth:`fed` after which a keyed line drops (0 = off).
    """

    def __init__(self, keyer: Keyer, name: str, tot: float = 0.0, stall: float = 1.0) -> None:
        self.keyer, self.name, self.tot, self.stall = keyer, name, tot, stall
        self.wanted = False
        self.line = False  # what we last drove the line to
        self.device_up = False
        self.tot_tripped = False
        self.inhibited = ""  # why the line must stay down (sound card lost), or ""
        self.release_at: float | None = None
        self.keyed_at = 0.0
        self.last_fed = time.monotonic()
        self.retry_at = 0.0
        self.retry_wait = RETRY_FIRST_S
        self.counts = {"ptt_keyups": 0, "tot_trips": 0, "watchdog_trips": 0, "device_errors": 0}
        self.tx_seconds = 0.0
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None

    # --- life -----------------------------------------------------------------

    def open(self) -> None:
        """Open the keyer (line set to unkeyed) and start the timer thread."""
        _install_last_resort()
        _LIVE.add(self)
        with self._cond:
            self._running = True
            try:
                self.keyer.open()
                self.device_up = True
            except OSError as exc:
                self._lost(f"PTT device did not open: {exc}")
        self._thread = threading.Thread(target=self._run, name=f"ptt-{self.name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Unkey now and release the device; safe to call twice."""
        with self._cond:
            self.wanted = False
            self._drive(False, "port closed")
            self._running = False
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._thread = None
        with contextlib.suppress(OSError):
            self.keyer.close()
        self.device_up = False
        _LIVE.discard(self)

    # --- what the port calls -------------------------------------------------

    def key(self, on: bool, release_after: float = 0.0) -> None:
        """Engine says transmit / stop. An unkey waits ``release_after`` (queued audio)."""
        with self._cond:
            if on:
                self.release_at = None
                if not self.wanted:
                    self.tot_tripped = False  # a new over
                self.wanted = True
                self.last_fed = time.monotonic()
                if self._may_key():
                    self._drive(True, "key")
            else:
                self.wanted = False
                if self.line:
                    if release_after > 0:
                        self.release_at = time.monotonic() + release_after
                    else:
                        self._drive(False, "unkey")
            self._cond.notify_all()

    def fed(self) -> None:
        """The engine handed this transmitter a frame: it is alive."""
        self.last_fed = time.monotonic()
        if self.wanted and not self.line and self.device_up and self._may_key():
            with self._cond:  # back from a watchdog trip
                if self.wanted and self._may_key():
                    self._drive(True, "engine alive again")

    def inhibit(self, why: str) -> None:
        """Hold PTT down whatever the engine wants, until :meth:`allow` (no audio path)."""
        with self._cond:
            self.inhibited = why
            self.release_at = None
            self._drive(False, why)
            self._cond.notify_all()

    def allow(self) -> None:
        """Lift :meth:`inhibit`; keys again if the engine still wants to transmit."""
        with self._cond:
            self.inhibited = ""
            if self.wanted and self._may_key():
                self._drive(True, "inhibit lifted")

    def _may_key(self) -> bool:
        return not self.line and not self.tot_tripped and not self.inhibited

    def force_off(self, why: str) -> None:
        """Drop PTT now, whatever the engine wants (sound card lost, exit)."""
        with self._cond:
            self.release_at = None
            self._drive(False, why)
            self._cond.notify_all()

    @property
    def keyed(self) -> bool:
        return self.line

    def stats(self) -> dict[str, float]:
        tx = self.tx_seconds + (time.monotonic() - self.keyed_at if self.line else 0.0)
        return {**{k: float(v) for k, v in self.counts.items()}, "tx_seconds": tx}

    # --- inside --------------------------------------------------------------

    def _drive(self, on: bool, why: str) -> None:
        """Set the line (caller holds the lock). Device errors mark it down, never raise."""
        if on == self.line and (on or not self.device_up):
            return
        if not self.device_up:
            self.line = False
            return
        now = time.monotonic()
        if self.line and not on:
            self.tx_seconds += now - self.keyed_at
        if on:
            self.keyed_at = now
            self.counts["ptt_keyups"] += 1
        self.line = on
        try:
            self.keyer.set(on)
            log.debug("%s: PTT %s (%s)", self.name, "on" if on else "off", why)
        except OSError as exc:
            self.line = False
            self._lost(f"PTT {'key' if on else 'unkey'} failed: {exc}")

    def _lost(self, reason: str) -> None:
        if self.device_up or self.counts["device_errors"] == 0:
            log.warning("%s: %s; retrying", self.name, reason)
        self.counts["device_errors"] += 1
        self.device_up = False
        self.line = False
        with contextlib.suppress(OSError):
            self.keyer.fail()
        self.retry_at = time.monotonic() + self.retry_wait
        self.retry_wait = min(RETRY_MAX_S, self.retry_wait * 2)

    def _run(self) -> None:
        with self._cond:
            while self._running:
                now = time.monotonic()
                deadlines = []
                if self.release_at is not None:
                    if now >= self.release_at:
                        self.release_at = None
                        self._drive(False, "unkey after queued audio")
                    else:
                        deadlines.append(self.release_at)
                if self.line and self.tot > 0:
                    tot_at = self.keyed_at + self.tot
                    if now >= tot_at:
                        self.tot_tripped = True
                        self.counts["tot_trips"] += 1
                        log.warning("%s: transmit time-out (%.0fs): PTT dropped",
                                    self.name, self.tot)  # fmt: skip
                        self._drive(False, "transmit TOT")
                    else:
                        deadlines.append(tot_at)
                if self.line and self.stall > 0:
                    stall_at = self.last_fed + self.stall
                    if now >= stall_at:
                        self.counts["watchdog_trips"] += 1
                        log.warning("%s: no audio from the engine for %.1fs: PTT dropped",
                                    self.name, self.stall)  # fmt: skip
                        self._drive(False, "watchdog")
                    else:
                        deadlines.append(stall_at)
                if not self.device_up:
                    if now >= self.retry_at:
                        self._retry()
                    deadlines.append(self.retry_at if not self.device_up else now + 0.05)
                wait = min(deadlines) - time.monotonic() if deadlines else 1.0
                self._cond.wait(timeout=max(0.001, min(wait, 1.0)))

    def _retry(self) -> None:
        if not self.keyer.present():
            self.retry_at = time.monotonic() + min(self.retry_wait, 1.0)
            return
        try:
            self.keyer.open()
        except OSError as exc:
            self._lost(f"PTT device reopen failed: {exc}")
            return
        log.warning("%s: PTT device is back", self.name)
        self.device_up = True
        self.retry_wait = RETRY_FIRST_S
        if self.wanted and self._may_key():
            self._drive(True, "device back")


__all__ = [
    "Cm108Keyer",
    "GpioKeyer",
    "Keyer",
    "LineError",
    "PttController",
    "SerialKeyer",
    "release_all",
]
