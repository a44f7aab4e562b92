"""The PTT guardian: a tiny process that owns every PTT line and keys one only while asked.

A CM108's GPIO latch, a GPIO pin and a serial port's RTS all hold their last level
when the process that drove them is gone. If that process is the gateway and it dies
hard (SIGKILL, the OOM killer, a segfault in a C extension) or hangs (SIGSTOP, a
wedged tick), a transmitter left keyed blocks the channel for everyone on it. So the
lines live here instead, in a process that does nothing else:

- the gateway asks for a line with ``on`` messages, from its media ticks, at least
  every :data:`HEARTBEAT_TIMEOUT_S` / 5 (a heartbeat);
  a keyed line whose heartbeat stops for :data:`HEARTBEAT_TIMEOUT_S` is unkeyed, and
  keyed again only when the gateway asks again;
- the **transmit TOT** runs here, so it holds even when the gateway is stopped;
- "release after the queued audio" (``off`` with ``after``) is timed here too;
- a closed socket (the gateway died, however) or a signal it can catch unkeys every
  line, logs it, and ends the guardian;
- a line that cannot be unkeyed (device gone) is logged as an ERROR and reported
  (``stuck``) until it is reopened and driven unkeyed;
- it raises itself above the gateway's realtime priority and sets its
  ``oom_score_adj`` to -1000, where allowed, so it is the last thing standing.

It is started by :mod:`.ptt` as ``python -S guardian.py --fd N`` (a script by path,
without ``site``, so that neither NumPy nor the gateway package nor an install's
import hooks are loaded), and talks JSON messages over a ``SOCK_SEQPACKET`` socket
pair, one message per read or write.

The keyer classes are here because this is the only process that drives a PTT line;
``borderlink unkey`` uses them directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time

TYPE_CHECKING = False  # not typing's: importing typing costs the guardian half a MB

try:
    from .lines import Cm108, GpioLine, SerialLines
except ImportError:  # run as a script by path: the gateway package stays out of memory
    from lines import Cm108, GpioLine, SerialLines  # type: ignore[no-redef]

if TYPE_CHECKING:  # (nor logging nor socket: the guardian stays small)
    from typing import Any


class _Log:
    """The gateway's log format on stderr, without importing ``logging``."""

    def _say(self, level: str, msg: str, *args: object) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        line = f"{stamp},{int(now % 1 * 1000):03d} {level} gateway.hardware.guardian: "
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(line + (msg % args if args else msg) + "\n")
            sys.stderr.flush()

    def warning(self, msg: str, *args: object) -> None:
        self._say("WARNING", msg, *args)

    def error(self, msg: str, *args: object) -> None:
        self._say("ERROR", msg, *args)


log = _Log()

HEARTBEAT_TIMEOUT_S = 0.25  # a keyed line with no word from the gateway this long drops
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
PRIORITY = 4  # SCHED_FIFO: above the gateway's recommended 3, below JACK's clients (5)
CAUGHT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")


# --- keyers: one PTT line each -------------------------------------------------------


class Keyer:
    """A radio keyed by its own VOX (``type = "none"``): nothing to drive."""

    description = "none (VOX-keyed radio)"

    def spec(self) -> dict[str, Any]:
        """What the guardian needs to build the same keyer (JSON)."""
        return {"type": "none"}

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
        self.device, self.line, self.invert = device, line, invert
        self.lines = SerialLines(device, idle={line: invert})
        self.description = f"serial {device} {line.upper()}{' inverted' if invert else ''}"

    def spec(self) -> dict[str, Any]:
        return {"type": "serial", "device": self.device, "line": self.line, "invert": self.invert}

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
        self.device, self.gpio, self.invert = device, gpio, invert
        self.hid = Cm108(device)
        self.description = f"CM108 {device} GPIO{gpio}{' inverted' if invert else ''}"

    def spec(self) -> dict[str, Any]:
        return {"type": "cm108", "device": self.device, "gpio": self.gpio, "invert": self.invert}

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
        self.chip, self.line, self.invert = chip, line, invert
        self.gpio = GpioLine(chip, line, output=True, idle=invert)
        self.description = f"GPIO {chip} line {line}{' inverted' if invert else ''}"

    def spec(self) -> dict[str, Any]:
        return {"type": "gpio", "chip": self.chip, "line": self.line, "invert": self.invert}

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


def keyer_from_spec(spec: dict[str, Any]) -> Keyer:
    kind = spec.get("type", "none")
    if kind == "serial":
        return SerialKeyer(spec["device"], spec.get("line", "rts"), spec.get("invert", False))
    if kind == "cm108":
        return Cm108Keyer(spec["device"], spec.get("gpio", 3), spec.get("invert", False))
    if kind == "gpio":
        return GpioKeyer(spec["chip"], spec["line"], spec.get("invert", False))
    return Keyer()


def unkey(keyer: Keyer) -> None:
    """Open the line (which drives it unkeyed), drive it unkeyed again, release it.

    Raises OSError when the line cannot be reached."""
    keyer.open()
    try:
        keyer.set(False)
    finally:
        keyer.close()


# --- one guarded line ---------------------------------------------------------------


class Line:
    """One PTT line and the rules it follows: heartbeat, TOT, release after the audio."""

    def __init__(self, name: str, keyer: Keyer, tot: float) -> None:
        self.name, self.keyer, self.tot = name, keyer, tot
        self.want = False  # the gateway's last word
        self.keyed = False  # what we last drove the line to
        self.device_up = False
        self.tot_tripped = False
        self.stuck = ""  # why the line could not be unkeyed, or ""
        self.missed = False  # unkeyed for a missed heartbeat, waiting for the gateway
        self.last_beat = time.monotonic()
        self.release_at: float | None = None
        self.keyed_at = 0.0
        self.tx_seconds = 0.0
        self.retry_at = 0.0
        self.retry_wait = RETRY_FIRST_S
        self.counts = {"ptt_keyups": 0, "tot_trips": 0, "watchdog_trips": 0, "device_errors": 0}
        self.ack = 0  # the last numbered message applied (the gateway waits for it)
        self.error = ""
        self.reported: tuple = ()

    def open(self) -> None:
        try:
            self.keyer.open()
        except OSError as exc:
            self._lost(f"PTT device did not open: {exc}", unkeying=False)
            return
        self.device_up = True

    def state(self) -> dict[str, Any]:
        return {
            "op": "state",
            "ack": self.ack,
            "keyed": self.keyed,
            "device_up": self.device_up,
            "tot_tripped": self.tot_tripped,
            "stuck": self.stuck,
            "keyed_at": self.keyed_at,
            "tx_seconds": self.tx_seconds,
            "counts": self.counts,
            "error": self.error,
        }

    # --- the gateway's words ---

    def on(self, now: float) -> None:
        if not self.want:
            self.tot_tripped = False  # a new over
        self.want = True
        self.last_beat = now
        self.release_at = None
        if not self.keyed and not self.tot_tripped and self.device_up:
            if self.missed:
                log.warning("%s: the gateway asks again: PTT back on", self.name)
            self._drive(True)
        self.missed = False

    def off(self, now: float, after: float) -> None:
        self.want = False
        self.last_beat = now
        self.missed = False
        if self.keyed and after > 0:
            self.release_at = now + after
        else:
            self.release_at = None
            self._drive(False)

    # --- the timers ---

    def check(self, now: float) -> float:
        """Apply whatever is due; return when to look again."""
        due = [now + 1.0]
        if self.release_at is not None:
            if now >= self.release_at:
                self.release_at = None
                self._drive(False)
            else:
                due.append(self.release_at)
        if self.keyed and self.tot > 0:
            if now >= self.keyed_at + self.tot:
                self.tot_tripped = True
                self.counts["tot_trips"] += 1
                log.warning("%s: transmit time-out (%.0fs): PTT dropped", self.name, self.tot)
                self._drive(False)
            else:
                due.append(self.keyed_at + self.tot)
        if self.keyed:
            if now >= self.last_beat + HEARTBEAT_TIMEOUT_S:
                self.counts["watchdog_trips"] += 1
                self.missed = True
                log.warning(
                    "%s: no heartbeat from the gateway for %.0f ms: PTT dropped",
                    self.name,
                    (now - self.last_beat) * 1000,
                )
                self._drive(False)
            else:
                due.append(self.last_beat + HEARTBEAT_TIMEOUT_S)
        if not self.device_up:
            if now >= self.retry_at:
                self._retry()
            due.append(self.retry_at)
        return min(due)

    def release(self, why: str) -> None:
        """Unkey for good (the guardian is ending): drive the line down, close it."""
        self.want = False
        if self.device_up:
            self._drive(False, always=True)
        elif self.keyed or self.stuck:
            log.error(
                "%s: PTT could not be unkeyed (%s): %s — the transmitter may be stuck keyed",
                self.name,
                why,
                self.stuck or "device down",
            )
        with contextlib.suppress(OSError):
            self.keyer.close()

    # --- inside ---

    def _drive(self, on: bool, always: bool = False) -> None:
        if on == self.keyed and not always:
            return
        now = time.monotonic()
        if self.keyed and not on:
            self.tx_seconds += now - self.keyed_at
        try:
            self.keyer.set(on)
        except OSError as exc:
            self.keyed = False
            self._lost(f"PTT {'key' if on else 'unkey'} failed: {exc}", unkeying=not on)
            return
        if on:
            self.keyed_at = now
            self.counts["ptt_keyups"] += 1
        self.keyed = on
        if not on and self.stuck:
            log.warning("%s: PTT unkeyed at last", self.name)
            self.stuck = ""

    def _lost(self, reason: str, unkeying: bool) -> None:
        if unkeying:  # the line may still be keyed and we cannot reach it
            self.stuck = reason
            log.error("%s: %s — the transmitter may be stuck keyed; retrying", self.name, reason)
        elif self.device_up or self.counts["device_errors"] == 0:
            log.warning("%s: %s; retrying", self.name, reason)
        self.error = reason
        self.counts["device_errors"] += 1
        self.device_up = False
        with contextlib.suppress(OSError):
            self.keyer.fail()
        self.retry_at = time.monotonic() + self.retry_wait
        self.retry_wait = min(RETRY_MAX_S, self.retry_wait * 2)

    def _retry(self) -> None:
        if not self.keyer.present():
            self.retry_at = time.monotonic() + min(self.retry_wait, 1.0)
            return
        try:
            self.keyer.open()  # opening drives the line unkeyed
        except OSError as exc:
            self._lost(f"PTT device reopen failed: {exc}", unkeying=bool(self.stuck))
            return
        log.warning("%s: PTT device is back", self.name)
        if self.stuck:
            log.warning("%s: PTT unkeyed at last", self.name)
        self.device_up, self.stuck, self.error = True, "", ""
        self.retry_wait = RETRY_FIRST_S
        if self.want and not self.tot_tripped and not self.missed:
            self._drive(True)


# --- the process ---------------------------------------------------------------------


class Guardian:
    """The loop: read the gateway's messages, apply the timers, report changes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd  # a SOCK_SEQPACKET socket: one read or write is one message
        self.lines: dict[str, Line] = {}
        self.dirty: set[str] = set()

    def run(self) -> str:
        """Serve until the gateway goes; return why."""
        os.set_blocking(self.fd, False)
        wake = time.monotonic()
        while True:
            wait = max(0.0, wake - time.monotonic())
            writable = [self.fd] if self.dirty else []
            readable, _, _ = select.select([self.fd], writable, [], wait)
            if readable and not self._read():
                return "the gateway closed its end (it exited or died)"
            now = time.monotonic()
            wake = min((line.check(now) for line in self.lines.values()), default=now + 1.0)
            for key, line in self.lines.items():
                if _changed(line):
                    self.dirty.add(key)
            self._flush()

    def _read(self) -> bool:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self._apply(json.loads(data))

    def _apply(self, msg: dict[str, Any]) -> None:
        op, key = msg.get("op"), str(msg.get("id"))
        now = time.monotonic()
        if op == "open":
            line = Line(msg.get("name", key), keyer_from_spec(msg["keyer"]), float(msg["tot"]))
            self.lines[key] = line
            line.open()
        line = self.lines.get(key)
        if line is None:
            return
        if op == "on":
            line.on(now)
        elif op == "off":
            line.off(now, float(msg.get("after", 0.0)))
        elif op == "close":
            line.release("port closed")
            del self.lines[key]
            self.dirty.discard(key)
            self._send({"op": "closed", "id": key, "ack": msg.get("seq", 0)})
            return
        if msg.get("seq"):
            line.ack = msg["seq"]
            self.dirty.add(key)

    def _flush(self) -> None:
        for key in list(self.dirty):
            line = self.lines.get(key)
            if line is None or self._send({**line.state(), "id": key}):
                self.dirty.discard(key)
            else:
                return

    def _send(self, msg: dict[str, Any]) -> bool:
        try:
            os.write(self.fd, json.dumps(msg).encode())
        except BlockingIOError:  # the gateway is not reading (stopped): later
            return False
        except OSError:
            return True  # gone: the next read says so
        return True

    def release_all(self, why: str) -> None:
        for line in self.lines.values():
            line.release(why)
        if self.lines:
            log.warning(
                "PTT guardian: %s: every PTT line unkeyed (%s)",
                why,
                ", ".join(line.name for line in self.lines.values()),
            )


def _changed(line: Line) -> bool:
    """Whether what the gateway sees of ``line`` changed since the last look."""
    now = (line.keyed, line.device_up, line.tot_tripped, line.stuck, line.counts["device_errors"])
    if line.reported == now:
        return False
    line.reported = now
    return True


def raise_priority() -> str:
    """SCHED_FIFO above the gateway's, oom_score_adj -1000: where allowed. Says what it got."""
    got = []
    try:
        current = os.sched_getparam(0).sched_priority
        policy = os.sched_getscheduler(0)
        want = max(PRIORITY, current + 1) if policy == os.SCHED_FIFO else PRIORITY
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(want))
        got.append(f"SCHED_FIFO {want}")
    except OSError as exc:
        log.warning(
            "PTT guardian: no realtime priority (%s); grant it LimitRTPRIO= "
            "(packaging/systemd/borderlink.service)",
            exc.strerror,
        )
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
        got.append("oom_score_adj -1000")
    except OSError as exc:
        log.warning(
            "PTT guardian: oom_score_adj -1000 refused (%s); the unit's OOMScoreAdjust= allows it",
            exc.strerror,
        )
    return ", ".join(got) or "normal priority"


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"signal {signal.Signals(signum).name}")


def _site_path() -> None:
    """Run with ``python -S``: the gateway's path (pyserial, gpiod), and a site's
    ``sitecustomize`` as ``site`` would have imported it."""
    sys.path.extend(
        p
        for p in os.environ.get("BORDERLINK_GUARDIAN_PATH", "").split(os.pathsep)
        if p and p not in sys.path
    )
    with contextlib.suppress(ImportError):
        import sitecustomize  # noqa: F401


def main(argv: list[str]) -> int:
    _site_path()
    fd = int(argv[argv.index("--fd") + 1])
    for name in CAUGHT_SIGNALS:
        signal.signal(getattr(signal, name), _exit_on_signal)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    guardian = Guardian(fd)
    why = "ended"
    try:
        got = raise_priority()
        os.write(
            fd,
            json.dumps(
                {"op": "hello", "pid": os.getpid(), "priority": got, "timeout": HEARTBEAT_TIMEOUT_S}
            ).encode(),
        )
        why = guardian.run()
    except SystemExit as exc:
        why = str(exc.code)
    finally:
        for name in CAUGHT_SIGNALS:  # nothing may interrupt the unkeying now
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        guardian.release_all(why)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
