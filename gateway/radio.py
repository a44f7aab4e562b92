"""``kind = "soundcard"``: a real radio on a sound card, with its PTT and squelch lines.

This joins ``hardware/`` (which knows nothing of the engine) to the engine's Port
interface. Who does what, so nothing is counted twice:

- **PTT hang time** is the common ``ptt_hang_time`` key, applied by the engine
  (it keeps the port keyed while the talkgroup pauses between overs). The port
  adds only the few milliseconds its queued audio needs to leave the card, so
  the last syllable is not clipped — never a second hang time.
- **TX delay** (``tx_delay``) is the port's: PTT goes up at once and the audio
  starts that much later (it is held, not cut).
- **Transmit TOT** (``tx_tot``) is the port's, run by the PTT guardian process
  (``hardware/guardian.py``), independent of the audio path and of the gateway's
  own fate. The common ``tot`` key is the engine's *talker* time-out (a stuck
  receiver, a stuck microphone), a different thing.
- **Squelch hang** and **open delay** are the port's (``[…squelch]`` table);
  the common ``anti_kerchunk`` is the engine's. Use one of the two open delays,
  not both: the config refuses ``squelch.open_delay`` with ``anti_kerchunk``.
- **Gains** are the common ``rx_gain_db``/``tx_gain_db``, applied by the engine.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from gateway.config import Model, PortConfig, Timing
from gateway.hardware import ptt as ptt_mod
from gateway.hardware import squelch as sq
from gateway.hardware.ctcss import make_filter
from gateway.hardware.soundcard import CardSpec, SoundCard
from gateway.ports import Frame, Port
from gateway.units import Duration, parse_duration

log = logging.getLogger(__name__)

DETECTOR_RETRY_S = 1.0


class SerialPtt(Model):
    type: Literal["serial"]
    device: str = Field(min_length=1, description="/dev/ttyUSB0, or a /dev/serial/by-id/… name")
    line: Literal["rts", "dtr"] = "rts"
    invert: bool = False


class Cm108Ptt(Model):
    type: Literal["cm108"]
    device: str = Field(min_length=1, description="/dev/hidrawN of the fob")
    gpio: int = Field(3, ge=1, le=8)
    invert: bool = False


class GpioPtt(Model):
    type: Literal["gpio"]
    chip: str = Field(min_length=1)
    line: int = Field(ge=0)
    invert: bool = False


class NoPtt(Model):
    type: Literal["none"] = "none"


PttConfig = Annotated[SerialPtt | Cm108Ptt | GpioPtt | NoPtt, Field(discriminator="type")]

_SQUELCH_NEEDS = {
    "serial": ("device",),
    "cm108": ("device",),
    "gpio": ("chip", "line"),
    "vox": (),
    "ctcss": ("tone_hz",),
    "none": (),
}


class SquelchConfig(Model):
    """How the port knows its radio is receiving (COR), and the squelch timing."""

    type: Literal["serial", "cm108", "gpio", "vox", "ctcss", "none"] = "vox"
    device: str | None = None
    line: str | int | None = None  # serial: cts/dsr/dcd/ri; gpio: line offset
    chip: str | None = None
    pin: Literal["vol_up", "vol_dn", "mute", "record_mute"] = "vol_dn"
    invert: bool = False
    threshold_dbfs: float = Field(-40.0, le=0)
    tone_hz: float | None = Field(None, ge=30, le=300)
    combine: Literal["and", "or"] = "and"
    open_delay: Duration = 0.0
    hang: Duration = 0.3

    @model_validator(mode="after")
    def _has_what_type_needs(self) -> SquelchConfig:
        missing = [k for k in _SQUELCH_NEEDS[self.type] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"squelch type {self.type!r} needs {', '.join(missing)}")
        serial_inputs = ("cts", "dsr", "dcd", "ri")
        if self.type == "serial" and self.line is not None and self.line not in serial_inputs:
            raise ValueError("serial squelch line must be 'cts', 'dsr', 'dcd' or 'ri'")
        if self.type == "gpio" and not isinstance(self.line, int):
            raise ValueError("gpio squelch needs line = <offset number> on the chip")
        return self


class SoundcardConfig(PortConfig):
    """A radio on a sound card: audio in/out, PTT line, squelch (COR) detection."""

    default_duplex: ClassVar[str] = "half"
    device: str | int
    host_api: str | None = None
    sample_rate: int | None = Field(None, ge=8000, le=192000)
    input_channel: int = Field(1, ge=1, le=32)
    output_channel: int = Field(1, ge=1, le=32)
    blocksize: int = Field(0, ge=0, le=8192)
    latency: str = "low"
    buffer_margin: Duration = 0.001
    max_drift_ppm: float = Field(500.0, gt=0, le=5000)
    tx_delay: Duration = 0.0
    tx_tot: Duration = 180.0
    rx_highpass: bool = False
    ptt: PttConfig = NoPtt()
    squelch: SquelchConfig = SquelchConfig()

    @field_validator("latency")
    @classmethod
    def _latency(cls, value: str) -> str:
        if value not in ("low", "high"):
            parse_duration(value)
        return value

    @field_validator("tx_delay")
    @classmethod
    def _tx_delay(cls, value: float) -> float:
        if value > 2.0:
            raise ValueError("tx_delay longer than 2s is surely a mistake (typical: 50ms–300ms)")
        return value

    @model_validator(mode="after")
    def _timing_is_possible(self) -> SoundcardConfig:
        if self.tx_tot and self.tx_delay >= self.tx_tot:
            raise ValueError(
                "tx_delay must be shorter than tx_tot: the transmitter would time out "
                "before any audio went out"
            )
        if self.squelch.open_delay and self.anti_kerchunk:
            raise ValueError(
                "set squelch.open_delay or anti_kerchunk, not both: each delays the "
                "squelch opening and together they add up"
            )
        if self.buffer_margin > 0.05:
            raise ValueError(
                "buffer_margin above 50ms defeats the low-latency design; 1ms–5ms is usual"
            )
        return self

    def device_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """What ``borderlink check`` finds missing on this machine: the card, the PTT
        line and the squelch line, each with the key that names it."""
        from gateway.hardware.devices import card_problem, line_problem

        problems = []
        card = card_problem(self.device, self.host_api, self.input_channel, self.output_channel)
        if card:
            problems.append((("device",), card))
        lines: list[tuple[tuple[str, ...], str | None]] = []
        if isinstance(self.ptt, SerialPtt | Cm108Ptt):
            lines.append((("ptt", "device"), self.ptt.device))
        elif isinstance(self.ptt, GpioPtt):
            lines.append((("ptt", "chip"), self.ptt.chip))
        if self.squelch.type in ("serial", "cm108"):
            lines.append((("squelch", "device"), self.squelch.device))
        elif self.squelch.type == "gpio":
            lines.append((("squelch", "chip"), self.squelch.chip))
        for key, path in lines:
            if path and (problem := line_problem(path)):
                problems.append((key, problem))
        return problems

    @property
    def latency_setting(self) -> float | str:
        return self.latency if self.latency in ("low", "high") else parse_duration(self.latency)


def build_keyer(cfg: SerialPtt | Cm108Ptt | GpioPtt | NoPtt) -> ptt_mod.Keyer:
    if isinstance(cfg, SerialPtt):
        return ptt_mod.SerialKeyer(cfg.device, cfg.line, cfg.invert)
    if isinstance(cfg, Cm108Ptt):
        return ptt_mod.Cm108Keyer(cfg.device, cfg.gpio, cfg.invert)
    if isinstance(cfg, GpioPtt):
        return ptt_mod.GpioKeyer(cfg.chip, cfg.line, cfg.invert)
    return ptt_mod.Keyer()


def build_detector(cfg: SquelchConfig, rate: int) -> sq.Detector:
    kind = cfg.type
    if kind == "serial":
        base: sq.Detector = sq.SerialCor(cfg.device or "", str(cfg.line or "cts"), cfg.invert)
    elif kind == "cm108":
        base = sq.Cm108Cor(cfg.device or "", cfg.pin, cfg.invert)
    elif kind == "gpio":
        base = sq.GpioCor(cfg.chip or "", int(cfg.line or 0), cfg.invert)
    elif kind == "vox":
        base = sq.Vox(cfg.threshold_dbfs)
    elif kind == "ctcss":
        return sq.Ctcss(rate, float(cfg.tone_hz or 0))
    else:
        return sq.Detector()
    if cfg.tone_hz is not None:
        return sq.Combined([base, sq.Ctcss(rate, cfg.tone_hz)], cfg.combine)
    return base


class SoundcardPort(Port):
    """A radio: received audio gated by its squelch, transmit audio keyed by its PTT."""

    recovers_itself = True  # a card or PTT line that did not open is retried in the background

    def __init__(self, name: str, config: SoundcardConfig, timing: Timing) -> None:
        super().__init__(name, config, timing)
        self.cfg = config
        self.detector = build_detector(config.squelch, self.rate)
        self.squelch = sq.Squelch(timing.frame, config.squelch.open_delay, config.squelch.hang)
        self.ptt = ptt_mod.PttController(build_keyer(config.ptt), name, tot=config.tx_tot)
        self.filter = make_filter(self.rate) if config.rx_highpass else None
        self.card = SoundCard(self._card_spec(), self.rate, self.frame_samples, name)
        self.card.on_state = self._card_state
        self.detector_up = False
        self.detector_retry_at = 0.0
        self.detector_errors = 0
        self.wanted = False
        self.last_rx: Frame | None = None  # for `borderlink levels`
        self.last_tx: Frame | None = None

    def _card_spec(self) -> CardSpec:
        cfg = self.cfg
        return CardSpec(
            device=cfg.device,
            host_api=cfg.host_api,
            sample_rate=cfg.sample_rate,
            input_channels=cfg.input_channel,
            output_channels=cfg.output_channel,
            input_channel=cfg.input_channel - 1,
            output_channel=cfg.output_channel - 1,
            blocksize=cfg.blocksize,
            latency=cfg.latency_setting,
            margin=cfg.buffer_margin,
            max_ppm=cfg.max_drift_ppm,
        )

    # --- life ------------------------------------------------------------------

    def open(self) -> None:
        self.ptt.open()
        self._open_detector()
        try:
            self.card.open()
        except (OSError, LookupError) as exc:
            self.card.lost_because(f"did not open: {exc}")  # keep retrying in the background
            raise

    def close(self) -> None:
        self.wanted = False
        self.keyed = False
        self.ptt.close()  # PTT first: whatever else fails, the transmitter is down
        self.card.close()
        with contextlib.suppress(OSError):
            self.detector.close()

    def _open_detector(self) -> None:
        try:
            self.detector.open()
            self.detector_up = True
        except OSError as exc:
            self._detector_lost(exc)

    def _detector_lost(self, exc: OSError) -> None:
        if self.detector_up or self.detector_errors == 0:
            log.warning("%s: squelch input lost (%s); retrying", self.name, exc)
        self.detector_errors += 1
        self.detector_up = False
        with contextlib.suppress(OSError):
            self.detector.fail()
        self.detector_retry_at = time.monotonic() + DETECTOR_RETRY_S

    def _card_state(self, up: bool, reason: str) -> None:
        if up:
            self.ptt.allow()
        else:
            self.ptt.inhibit(f"sound card lost: {reason}")

    # --- the tick ----------------------------------------------------------------

    def read(self) -> Frame | None:
        frame = self.card.read()
        if (
            not self.detector_up
            and time.monotonic() >= self.detector_retry_at
            and self.detector.present()
        ):
            self._open_detector()
        detected = False
        if self.detector_up:
            try:
                detected = self.detector.sample(frame)
            except OSError as exc:
                self._detector_lost(exc)
        # A momentary card underrun (frame None) is a gap in the audio, not the end of
        # the over: the squelch decides, and the gap is passed as silence.
        self.talking = self.squelch.update(detected) and self.card.up
        self.last_rx = frame
        if not self.talking:
            return None
        if frame is None:
            return np.zeros(self.frame_samples, np.float32)
        if self.filter is not None:
            frame = self.filter.process(frame)
        return frame

    def write(self, frame: Frame | None) -> None:
        self.ptt.fed()
        if self.ptt.tot_tripped:
            frame = None  # timed out: a VOX-keyed radio must not be keyed by the audio either
        if self.card.tx_extra and not self.ptt.keyed:
            self.card.release_tx()
        self.card.write(frame)
        self.last_tx = frame

    def end_of_tick(self, due: float) -> None:
        self.card.end_of_tick(due)

    def key(self, on: bool) -> None:
        self.keyed = on
        self.wanted = on
        if on:
            was = self.ptt.keyed
            self.ptt.key(True)
            if not was and self.ptt.keyed:
                self.card.hold_tx(self.cfg.tx_delay)
        else:
            self.ptt.key(False, release_after=self.card.queued_seconds() if self.card.up else 0.0)

    def stats(self) -> dict[str, float]:
        card = self.card.stats()
        ptt = self.ptt.stats()
        return {
            **card,
            **ptt,
            "squelch_open": float(self.talking),
            "squelch_openings": float(self.squelch.openings),
            "ptt_keyed": float(self.ptt.keyed),
            "device_up": float(self.card.up and self.ptt.device_up and self.detector_up),
            "device_errors": card["device_errors"] + ptt["device_errors"] + self.detector_errors,
        }


def rms_dbfs(frame: np.ndarray | None) -> float:
    if frame is None or not len(frame):
        return -120.0
    return float(max(-120.0, 20 * np.log10(max(float(np.sqrt(np.mean(frame * frame))), 1e-6))))
