"""Squelch / COR: is the radio receiving something we should pass on?

Detectors answer once per engine frame: a hardware COR line (serial CTS/DSR/DCD,
a CM108 fob's VOL_DN/VOL_UP/MUTE pin, a GPIO), the audio itself (VOX: level over a
dBFS threshold), a CTCSS tone, or a combination (COR AND CTCSS). :class:`Squelch`
then applies the timing radio people expect:

- *open delay* (anti-kerchunk at the line): the detector must say "open" this long
  before the squelch opens, so a key-up click or a noise burst is ignored; for VOX
  it is the attack time;
- *hang time*: the squelch stays open this long after the detector closes, so the
  gaps between words do not chop the over up; for VOX it is the release time.

These are the radio's own timings. The engine's ``anti_kerchunk`` (ignore whole
talk bursts shorter than X) works on what this module reports; a port uses one or
the other for kerchunks, not both (the config refuses both at once).
"""

from __future__ import annotations

import numpy as np
from gateway.codecs.pcm import SILENCE_DBFS

from .ctcss import make_detector
from .lines import Cm108, GpioLine, SerialLines


class Detector:
    """Never open: a transmit-only port (``type = "none"``)."""

    description = "none (transmit only)"
    uses_audio = False

    def open(self) -> None:
        """Acquire the device."""

    def close(self) -> None:
        """Release the device."""

    def fail(self) -> None:
        self.close()

    def present(self) -> bool:
        return True

    def sample(self, frame: np.ndarray | None) -> bool:
        """Open this frame? ``frame`` is the received audio (None: none this tick).

        Raises OSError when the device has gone (the port then reopens it).
        """
        return False


class SerialCor(Detector):
    """COR on a serial port's CTS, DSR, DCD or RI input."""

    def __init__(self, device: str, line: str = "cts", invert: bool = False) -> None:
        self.line, self.invert = line, invert
        self.lines = SerialLines(device)
        self.description = f"serial {device} {line.upper()}{' inverted' if invert else ''}"

    def open(self) -> None:
        self.lines.open()

    def close(self) -> None:
        self.lines.close()

    def fail(self) -> None:
        self.lines.fail()

    def present(self) -> bool:
        return self.lines.present()

    def sample(self, frame: np.ndarray | None) -> bool:
        return self.lines.get(self.line) != self.invert


class Cm108Cor(Detector):
    """COR on a CM108/CM119 fob's input pin (VOL_DN on the usual modified fobs)."""

    def __init__(self, device: str, pin: str = "vol_dn", invert: bool = False) -> None:
        self.pin, self.invert = pin, invert
        self.hid = Cm108(device)
        self.description = f"CM108 {device} {pin.upper()}{' inverted' if invert else ''}"

    def open(self) -> None:
        self.hid.open()

    def close(self) -> None:
        self.hid.close()

    def fail(self) -> None:
        self.hid.fail()

    def present(self) -> bool:
        return self.hid.present()

    def sample(self, frame: np.ndarray | None) -> bool:
        return self.hid.get(self.pin) != self.invert


class GpioCor(Detector):
    """COR on a Linux GPIO input line."""

    def __init__(self, chip: str, line: int, invert: bool = False) -> None:
        self.invert = invert
        self.gpio = GpioLine(chip, line, output=False)
        self.description = f"GPIO {chip} line {line}{' inverted' if invert else ''}"

    def open(self) -> None:
        self.gpio.open()

    def close(self) -> None:
        self.gpio.close()

    def present(self) -> bool:
        return self.gpio.present()

    def sample(self, frame: np.ndarray | None) -> bool:
        return self.gpio.get() != self.invert


class Vox(Detector):
    """Audio VOX: open while the received frame's RMS level is at or above a dBFS threshold.

    For a radio with no COR line: set the threshold between its squelched
    noise floor and speech (``borderlink levels`` shows both).
    """

    uses_audio = True

    def __init__(self, threshold_dbfs: float) -> None:
        self.threshold = threshold_dbfs
        self.description = f"VOX at {threshold_dbfs:g} dBFS"
        # the threshold as mean square (one dot product a frame, no logarithm)
        self.power = 10 ** (threshold_dbfs / 10) if threshold_dbfs > SILENCE_DBFS else -1.0

    def sample(self, frame: np.ndarray | None) -> bool:
        if frame is None:
            return False
        if not len(frame):
            return self.power < 0
        # (the array's own dot: np.dot's dispatch is a Python call more, each tick, per radio)
        return float(frame.dot(frame)) >= self.power * len(frame)


class Ctcss(Detector):
    """Open while the radio's received audio carries this CTCSS tone."""

    uses_audio = True

    def __init__(self, rate: int, tone_hz: float) -> None:
        self.decoder = make_detector(rate, tone_hz)
        self.silence = np.zeros(round(rate * 0.02), np.float32)
        self.description = f"CTCSS {tone_hz:g} Hz"

    def sample(self, frame: np.ndarray | None) -> bool:
        return bool(self.decoder.feed(self.silence if frame is None else frame))


class Combined(Detector):
    """Several detectors joined by AND (e.g. COR and CTCSS) or OR."""

    def __init__(self, parts: list[Detector], mode: str = "and") -> None:
        if mode not in ("and", "or"):
            raise ValueError("combine must be 'and' or 'or'")
        self.parts, self.mode = parts, mode
        self.uses_audio = any(p.uses_audio for p in parts)
        self.description = f" {mode.upper()} ".join(p.description for p in parts)

    def open(self) -> None:
        for part in self.parts:
            part.open()

    def close(self) -> None:
        for part in self.parts:
            part.close()

    def fail(self) -> None:
        for part in self.parts:
            part.fail()

    def present(self) -> bool:
        return all(p.present() for p in self.parts)

    def sample(self, frame: np.ndarray | None) -> bool:
        states = [p.sample(frame) for p in self.parts]  # every part sees every frame
        return all(states) if self.mode == "and" else any(states)


class Squelch:
    """Open delay and hang time, counted in engine frames."""

    def __init__(self, frame_seconds: float, open_delay: float = 0.0, hang: float = 0.0) -> None:
        self.open_frames = round(open_delay / frame_seconds)
        self.hang_frames = round(hang / frame_seconds)
        self.run = 0  # consecutive frames the detector said open
        self.quiet = 0  # frames since it last said open
        self.is_open = False
        self.openings = 0

    def update(self, detected: bool) -> bool:
        if detected:
            self.run += 1
            self.quiet = 0
            if not self.is_open and self.run > self.open_frames:
                self.is_open = True
                self.openings += 1
        else:
            self.run = 0
            self.quiet += 1
            if self.is_open and self.quiet > self.hang_frames:
                self.is_open = False
        return self.is_open

    def reset(self) -> None:
        self.run = self.quiet = 0
        self.is_open = False
