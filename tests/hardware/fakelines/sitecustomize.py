"""Stand-ins for the OS's control lines in the tests' child processes (the PTT guardian,
``borderlink unkey``): put this directory first on their PYTHONPATH.

- ``FAKE_MODEM=path``: a serial port's TIOCM* ioctls read and write modem bits kept in
  the JSON file ``path`` (``{"bits": int, "unplugged": bool, "history": [[monotonic,
  bits], ...]}``): Linux ptys have no modem lines. A fake of the OS call pyserial
  makes, not of our code.
- ``gpiod`` (the package beside this file): libgpiod's API over a file per chip.
"""

import errno
import json
import os
import struct
import termios
import time

_PATH = os.environ.get("FAKE_MODEM")


class FileModem:
    """The TIOCM* ioctls over a JSON file the test reads and writes too."""

    def __init__(self, real, path: str) -> None:
        self.real, self.path = real, path

    def ioctl(self, fd, request, arg=0, *rest):
        if request not in (termios.TIOCMBIS, termios.TIOCMBIC, termios.TIOCMGET, termios.TIOCMSET):
            return self.real.ioctl(fd, request, arg, *rest)
        with open(self.path) as f:
            state = json.load(f)
        if state.get("unplugged"):
            raise OSError(errno.EIO, "Input/output error")
        if request == termios.TIOCMGET:
            return struct.pack("I", state["bits"])
        (value,) = struct.unpack("I", arg)
        if request == termios.TIOCMBIS:
            state["bits"] |= value
        elif request == termios.TIOCMBIC:
            state["bits"] &= ~value
        else:
            state["bits"] = value
        state.setdefault("history", []).append([time.monotonic(), state["bits"]])
        with open(self.path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(self.path + ".tmp", self.path)
        return arg

    def __getattr__(self, name):
        return getattr(self.real, name)


if _PATH:
    import serial.serialposix

    serial.serialposix.fcntl = FileModem(serial.serialposix.fcntl, _PATH)
