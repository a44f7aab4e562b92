"""Control lines to and from a radio: serial modem lines, CM108 HID GPIO, Linux GPIO.

A radio interface often carries PTT *and* COR on one device (RTS out / CTS in on a
serial port; GPIO3 out / VOL_DN in on a CM108 fob), so each device is opened once
and shared by reference count between the PTT keyer and the squelch detector.

Every line raises ``OSError`` when its device has gone (USB unplugged); callers
mark the radio down and reopen with backoff. ``present()`` says whether the
device node is back, so reopening is only tried when it can succeed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading

TYPE_CHECKING = False  # not typing's: importing typing costs the guardian half a MB

if TYPE_CHECKING:  # the PTT guardian imports this module and stays small without typing
    from typing import Any

SERIAL_OUTPUTS = ("rts", "dtr")
SERIAL_INPUTS = ("cts", "dsr", "dcd", "ri")
# CM108/CM119 HID input report, byte 0: the fob's button pins (AllStar wires COR
# to VOL_DN and CTCSS-decode to VOL_UP on the usual modified fobs).
CM108_INPUT_BITS = {"vol_up": 0x01, "vol_dn": 0x02, "mute": 0x04, "record_mute": 0x08}
CM108_GPIOS = range(1, 9)


class LineError(OSError):
    """A control line cannot be used; the message says which device and why."""


def _describe(path: str, exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{path}: permission denied (add the gateway's user to the device's group, "
            "or a udev rule)"
        )
    if exc.errno == errno.EBUSY:
        return f"{path}: busy (another program holds it)"
    if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return f"{path}: no such device (unplugged, or the wrong name)"
    return f"{path}: {exc.strerror or exc}"


class _Shared:
    """One open handle per device path, shared by the PTT keyer and the COR detector."""

    _lock = threading.Lock()
    _open: dict[tuple[type, str], tuple[Any, int]] = {}

    @classmethod
    def acquire(cls, kind: type, path: str, opener: Any) -> Any:
        with cls._lock:
            handle, count = cls._open.get((kind, path), (None, 0))
            if handle is None:
                handle = opener()
            cls._open[(kind, path)] = (handle, count + 1)
            return handle

    @classmethod
    def release(cls, kind: type, path: str, closer: Any) -> None:
        with cls._lock:
            handle, count = cls._open.get((kind, path), (None, 0))
            if handle is None:
                return
            if count <= 1:
                del cls._open[(kind, path)]
                with contextlib.suppress(OSError):
                    closer(handle)
            else:
                cls._open[(kind, path)] = (handle, count - 1)

    @classmethod
    def drop(cls, kind: type, path: str, closer: Any) -> None:
        """Forget a dead handle so the next acquire reopens the device."""
        with cls._lock:
            entry = cls._open.pop((kind, path), None)
        if entry is not None:
            with contextlib.suppress(OSError):
                closer(entry[0])


class SerialLines:
    """Modem control lines of a serial port (pyserial): RTS/DTR out, CTS/DSR/DCD/RI in.

    pyserial raises RTS and DTR when it opens a port, which would key a radio wired
    to them; the lines are set to their idle level *before* the port is opened. A port
    opened for its inputs only (``idle`` empty: COR) keeps RTS and DTR where they are,
    since the PTT guardian, another process, may be driving one of them on the same port.
    """

    def __init__(self, path: str, idle: dict[str, bool] | None = None) -> None:
        self.path = path
        self.idle = idle or {}
        self.port: Any = None

    def _open(self) -> Any:
        import serial

        port = serial.Serial()
        port.port = self.path
        port.rts = self.idle.get("rts", False)
        port.dtr = self.idle.get("dtr", False)
        held = None
        if not self.idle:
            held, port.rts, port.dtr = self._outputs_now()
        try:
            port.open()
        except serial.SerialException as exc:
            inner = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
            why = _describe(self.path, OSError(inner, str(exc)))
            raise LineError(inner or errno.EIO, why) from exc
        finally:
            if held is not None:
                os.close(held)
        return port

    def _outputs_now(self) -> tuple[int | None, bool, bool]:
        """RTS and DTR as they are, read through a descriptor held open until pyserial has
        the port (closing the last one would drop them: HUPCL)."""
        import termios

        import serial.serialposix

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            return None, False, False  # pyserial's open will say why
        try:
            raw = serial.serialposix.fcntl.ioctl(fd, termios.TIOCMGET, struct.pack("I", 0))
            (bits,) = struct.unpack("I", raw)
        except OSError:
            return fd, False, False
        return fd, bool(bits & termios.TIOCM_RTS), bool(bits & termios.TIOCM_DTR)

    def open(self) -> None:
        if self.port is None:
            self.port = _Shared.acquire(SerialLines, self.path, self._open)

    def close(self) -> None:
        if self.port is not None:
            _Shared.release(SerialLines, self.path, self._close)
            self.port = None

    def fail(self) -> None:
        if self.port is not None:
            _Shared.drop(SerialLines, self.path, lambda p: p.close())
            self.port = None

    def present(self) -> bool:
        return os.path.exists(self.path)

    def _close(self, port: Any) -> None:
        """Close, leaving an output whose idle level is *asserted* (an inverted PTT) there:
        by default the kernel drops RTS and DTR when a tty's last user closes it (HUPCL),
        which would key such a radio as the gateway, its guardian or ``unkey`` ends."""
        if any(self.idle.values()):
            import termios

            with contextlib.suppress(OSError, termios.error, ValueError):
                attrs = termios.tcgetattr(port.fd)
                attrs[2] &= ~termios.HUPCL
                termios.tcsetattr(port.fd, termios.TCSANOW, attrs)
        port.close()

    def set(self, line: str, level: bool) -> None:
        if line not in SERIAL_OUTPUTS:
            raise ValueError(f"serial output line must be one of {SERIAL_OUTPUTS}, not {line!r}")
        port = self._need()
        try:
            setattr(port, line, level)
        except OSError as exc:
            raise LineError(exc.errno or errno.EIO, _describe(self.path, exc)) from exc

    def get(self, line: str) -> bool:
        if line not in SERIAL_INPUTS:
            raise ValueError(f"serial input line must be one of {SERIAL_INPUTS}, not {line!r}")
        port = self._need()
        attr = "cd" if line == "dcd" else line
        try:
            return bool(getattr(port, attr))
        except OSError as exc:
            raise LineError(exc.errno or errno.EIO, _describe(self.path, exc)) from exc

    def _need(self) -> Any:
        if self.port is None:
            raise LineError(errno.ENODEV, f"{self.path}: not open")
        return self.port


class Cm108:
    """A CM108/CM119 USB audio fob's HID side through ``/dev/hidrawN``.

    Output: the 5-byte report ``00 00 <GPIO levels> <GPIO direction mask> 00``
    (report id 0 first), GPIO1..8 as bits 0..7 — the layout Direwolf and AllStar
    write; PTT is GPIO3 on most fobs. Input: 4-byte reports whose first byte holds
    the VOL_UP, VOL_DN, MUTE and RECORD_MUTE pins; the fob sends one on change, so
    the last state seen is kept.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self.inputs = 0

    def _open(self) -> int:
        # O_APPEND means nothing to a hidraw node; a regular file standing in for one (the
        # tests') then keeps every report in order, whichever process opened it when.
        # O_NOCTTY: the PTT guardian leads a session of its own, and a tty it opened (a pty
        # standing in) would become its terminal, whose hangup would end it.
        flags = os.O_NONBLOCK | os.O_APPEND | os.O_NOCTTY
        try:
            return os.open(self.path, os.O_RDWR | flags)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                try:  # a stand-in or a write-only udev rule: output only
                    return os.open(self.path, os.O_WRONLY | flags)
                except OSError:
                    pass
            raise LineError(exc.errno or errno.EIO, _describe(self.path, exc)) from exc

    def open(self) -> None:
        if self.fd is None:
            self.fd = _Shared.acquire(Cm108, self.path, self._open)

    def close(self) -> None:
        if self.fd is not None:
            _Shared.release(Cm108, self.path, os.close)
            self.fd = None

    def fail(self) -> None:
        if self.fd is not None:
            _Shared.drop(Cm108, self.path, os.close)
            self.fd = None

    def present(self) -> bool:
        return os.path.exists(self.path)

    @staticmethod
    def report(gpio: int, level: bool) -> bytes:
        if gpio not in CM108_GPIOS:
            raise ValueError(f"CM108 GPIO must be 1..8, not {gpio}")
        bit = 1 << (gpio - 1)
        return bytes([0, 0, bit if level else 0, bit, 0])

    def set(self, gpio: int, level: bool) -> None:
        fd = self._need()
        try:
            os.write(fd, self.report(gpio, level))
        except OSError as exc:
            raise LineError(exc.errno or errno.EIO, _describe(self.path, exc)) from exc

    def get(self, pin: str) -> bool:
        """Level of an input pin, after draining every report queued since last time."""
        if pin not in CM108_INPUT_BITS:
            known = sorted(CM108_INPUT_BITS)
            raise ValueError(f"CM108 input pin must be one of {known}, not {pin!r}")
        fd = self._need()
        while True:
            try:
                data = os.read(fd, 64)
            except BlockingIOError:
                break
            except OSError as exc:
                raise LineError(exc.errno or errno.EIO, _describe(self.path, exc)) from exc
            if not data:
                break
            if len(data) >= 4:
                self.inputs = data[len(data) - len(data) % 4 - 4]
        return bool(self.inputs & CM108_INPUT_BITS[pin])

    def _need(self) -> int:
        if self.fd is None:
            raise LineError(errno.ENODEV, f"{self.path}: not open")
        return self.fd


class GpioLine:
    """One line of a Linux GPIO character device (``/dev/gpiochipN``) through libgpiod 2.

    ``gpiod`` is imported only when a site uses GPIO (install ``borderlink[gpio]``).
    """

    def __init__(self, chip: str, line: int, output: bool, idle: bool = False) -> None:
        self.chip, self.line, self.output, self.idle = chip, line, output, idle
        self.request: Any = None

    def open(self) -> None:
        if self.request is not None:
            return
        try:
            import gpiod
            from gpiod.line import Direction, Value
        except ImportError as exc:
            raise LineError(
                errno.ENOSYS,
                (
                    "GPIO PTT/COR needs the 'gpiod' package (libgpiod 2): "
                    "pip install 'borderlink[gpio]'"
                ),
            ) from exc
        settings = gpiod.LineSettings(
            direction=Direction.OUTPUT if self.output else Direction.INPUT,
            output_value=Value.ACTIVE if self.idle else Value.INACTIVE,
        )
        try:
            self.request = gpiod.request_lines(
                self.chip, consumer="borderlink", config={self.line: settings}
            )
        except OSError as exc:
            raise LineError(exc.errno or errno.EIO, _describe(self.chip, exc)) from exc
        self._value = Value

    def close(self) -> None:
        if self.request is not None:
            with contextlib.suppress(OSError):
                self.request.release()
            self.request = None

    fail = close

    def present(self) -> bool:
        return os.path.exists(self.chip)

    def set(self, level: bool) -> None:
        if self.request is None:
            raise LineError(errno.ENODEV, f"{self.chip}: not open")
        try:
            self.request.set_value(self.line, self._value.ACTIVE if level else self._value.INACTIVE)
        except OSError as exc:
            raise LineError(exc.errno or errno.EIO, _describe(self.chip, exc)) from exc

    def get(self) -> bool:
        if self.request is None:
            raise LineError(errno.ENODEV, f"{self.chip}: not open")
        try:
            return self.request.get_value(self.line) == self._value.ACTIVE
        except OSError as exc:
            raise LineError(exc.errno or errno.EIO, _describe(self.chip, exc)) from exc
