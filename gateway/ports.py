"""The Port: the one thing every endpoint is to the engine.

A radio, a SIP call, a browser, a trunk, a test file: each yields one frame (or
nothing) per tick, takes one frame (or nothing) per tick, says whether it is
*talking* (squelch open, VOX, PTT pressed) and can be *keyed* (transmit). The
engine knows no endpoint type, so every kind plugs in here.

Frames are float32 mono at the engine's internal rate, ``frame_samples`` long.
The frame handed to :meth:`Port.write` is a view into the engine's output buffer:
copy it if you keep it past the call.
"""

from __future__ import annotations

import logging
import wave
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soxr

from gateway.codecs.pcm import int16_to_float
from gateway.codecs.tones import ToneGenerator, speech_like
from gateway.config import (
    FileSourceConfig,
    PortConfig,
    SimulatedRadioConfig,
    TalkSchedule,
    Timing,
    ToneSourceConfig,
)
from gateway.endpoints import ENDPOINTS, Endpoint, load, port_kinds

log = logging.getLogger(__name__)

Frame = np.ndarray


class PortBank:
    """Endpoints that move the audio of all their ports in one step (SIP legs, consoles).

    Calling ``read()`` and ``write()`` on each of 750 call ports is about 1 µs of
    Python apiece per tick, a tenth of a network leg's whole budget. A bank fills
    all its rows of the engine's frame matrix, and takes all its listeners' mixes,
    in one NumPy step each. A port joins a bank by setting ``port.port_bank``; the
    engine then never calls its ``read()``/``write()`` (``key()``, ``stats()``,
    ``open()`` and ``close()`` stay per port). The ``ports`` list passed to both
    methods is the same object for as long as the engine's layout holds, so a bank
    may cache per-layout work (its own row of each port) keyed on that list.
    """

    def read_frames(
        self, ports: list[Port], frames: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Put this tick's audio of ``ports[k]`` in ``frames[rows[k]]``.

        Returns (has_frame, talking), bool arrays aligned with ``ports``; rows
        without a frame may be left as they are (the engine zeroed them).
        """
        raise NotImplementedError

    def write_frames(
        self, ports: list[Port], out: np.ndarray, rows: np.ndarray, audible: np.ndarray
    ) -> None:
        """``out[rows[k]]`` is what ``ports[k]`` hears where ``audible[k]``; silence elsewhere.

        The rows are only valid during the call: copy what must outlive the tick.
        """
        raise NotImplementedError


class Port:
    """Base class: a silent, never-talking port that accepts and drops audio."""

    kind = "port"
    can_talk = True
    can_transmit = True
    port_bank: PortBank | None = None  # set by endpoints that move audio in batches
    # True when open() failing leaves a port that keeps trying by itself (a sound card);
    # otherwise the gateway puts a DownPort in its place and retries it.
    recovers_itself = False

    def __init__(self, name: str, config: PortConfig, timing: Timing) -> None:
        self.name = name
        self.config = config
        self.rate = timing.rate
        self.frame_samples = timing.frame_samples
        self.keyed = False
        self.talking = False
        self.talkgroup = ""  # set by the gateway for configured ports (recordings are named so)
        # Where the port's own records go (the gateway sends them to the audit log).
        self.on_report: Callable[..., None] | None = None

    def report(self, event: str, **fields: object) -> None:
        """Something an auditor wants to know (a recording file opened or closed)."""
        log.info("%s %s %s", event, self.name, " ".join(f"{k}={v}" for k, v in fields.items()))
        if self.on_report is not None:
            self.on_report(event, port=self.name, **fields)

    @property
    def label(self) -> str:
        """The unit name people see (consoles, audit, MQTT): the config's ``label``, or the
        port's config key when none is given."""
        return getattr(self.config, "label", "") or self.name

    @property
    def half_duplex(self) -> bool:
        return self.config.half_duplex

    def open(self) -> None:
        """Acquire the device or socket. Called once before the first tick."""

    def close(self) -> None:
        """Release everything. Must leave a transmitter unkeyed, even after errors."""
        self.key(False)

    def read(self) -> Frame | None:
        """This tick's received audio, or None for silence. Sets ``talking``."""
        return None

    def write(self, frame: Frame | None) -> None:
        """This tick's audio to send (None: nothing to send, silence)."""

    def key(self, on: bool) -> None:
        """Key or unkey the transmitter (PTT)."""
        self.keyed = on

    def end_of_tick(self, due: float) -> None:
        """After this tick's read and write; ``due`` is its deadline (``time.monotonic()``).
        A port on a clock of its own (a sound card) measures its FIFOs against it."""

    def stats(self) -> dict[str, float]:
        """Counters and gauges for metrics, by well-known key (all optional):

        network legs: packets_in, packets_out, bytes_in, bytes_out, packets_lost,
        packets_late, packets_malformed, jitter_seconds, concealed_samples,
        jitter_buffer_seconds; radios: squelch_open, device_up, device_errors,
        tx_seconds. Counters only ever grow over the port's life.
        """
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class DownPort(Port):
    """Stands on the engine for a configured port that could not start (a missing file,
    an unplugged sound card): silent, never keyed, reported down with ``down_reason``
    while the gateway retries it."""

    can_talk = False
    can_transmit = False

    def __init__(self, name: str, config: PortConfig, timing: Timing, reason: str) -> None:
        super().__init__(name, config, timing)
        self.kind = config.kind
        self.down_reason = reason


def build_port(
    name: str, config: PortConfig, timing: Timing, endpoints: tuple[Endpoint, ...] = ENDPOINTS
) -> Port:
    """The Port the endpoint table names for ``config.kind`` (imported now, if not yet)."""
    try:
        _, factory = port_kinds(endpoints)[config.kind]
    except KeyError:
        raise ValueError(f"port {name!r}: no implementation for kind {config.kind!r}") from None
    port = load(factory)(name, config, timing)
    port.kind = config.kind
    return port


class Scheduler:
    """Talk bursts on a sample-count schedule, so simulated talkers are deterministic."""

    def __init__(self, schedule: TalkSchedule, rate: int) -> None:
        self.every = round(schedule.talk_every * rate)
        self.length = round(schedule.talk_for * rate)
        self.offset = round(schedule.talk_offset * rate)
        self.position = 0

    def advance(self, samples: int) -> bool:
        """True while this block falls inside a burst."""
        start = self.position
        self.position += samples
        if self.every == 0 and self.length == 0:
            return start >= self.offset
        if start < self.offset:
            return False
        phase = (start - self.offset) % self.every if self.every else start - self.offset
        return phase < self.length


class ToneSource(Port):
    """A test tone that talks on a schedule (or always)."""

    can_transmit = False

    def __init__(self, name: str, config: ToneSourceConfig, timing: Timing) -> None:
        super().__init__(name, config, timing)
        self.schedule = Scheduler(config, self.rate)
        self.tone = ToneGenerator([config.tone_hz], self.rate, config.level_dbfs)

    def read(self) -> Frame | None:
        self.talking = self.schedule.advance(self.frame_samples)
        return self.tone.read(self.frame_samples) if self.talking else None


class SimulatedRadio(Port):
    """A radio with no hardware: a tone, speech-like audio or a recorded voice on a schedule.

    A ``voice`` WAV is said from its start at every talk burst (an over is one
    message, as an officer's would be); the squelch stays open to the burst's end.
    Like a real half-duplex set it cannot hear while it talks, and what the gateway
    transmits to it is kept so a demo or test can show it (``last_heard``).
    """

    def __init__(self, name: str, config: SimulatedRadioConfig, timing: Timing) -> None:
        super().__init__(name, config, timing)
        self.schedule = Scheduler(config, self.rate)
        self.voice: np.ndarray | None = None
        self.tone: ToneGenerator | None = None
        if config.voice is None and config.audio == "speech":
            self.voice = self._at_level(speech_like(self.rate, 8.0, seed=zlib.crc32(name.encode())))
        elif config.voice is None:
            self.tone = ToneGenerator([config.tone_hz], self.rate, config.level_dbfs)
        self.voice_pos = 0
        self.last_heard: Frame | None = None

    def open(self) -> None:
        """Read the voice file now: a missing one makes this port down (and retried)."""
        if self.config.voice is not None:
            self.voice = self._at_level(read_wav(self.config.voice, self.rate))

    def _at_level(self, audio: np.ndarray) -> np.ndarray:
        peak = float(np.max(np.abs(audio), initial=0.0)) or 1.0
        return (audio * (10 ** (self.config.level_dbfs / 20) / peak)).astype(np.float32)

    def read(self) -> Frame | None:
        starting = not self.talking
        self.talking = self.schedule.advance(self.frame_samples)
        if not self.talking:
            return None
        if self.tone is not None:
            return self.tone.read(self.frame_samples)
        assert self.voice is not None
        n = self.frame_samples
        if self.config.voice is None:  # synthetic speech runs on from burst to burst
            idx = (self.voice_pos + np.arange(n)) % len(self.voice)
            self.voice_pos = int(idx[-1]) + 1
            return self.voice[idx]
        if starting:
            self.voice_pos = 0
        frame = np.zeros(n, np.float32)
        chunk = self.voice[self.voice_pos : self.voice_pos + n]
        frame[: len(chunk)] = chunk
        self.voice_pos += n
        return frame

    def write(self, frame: Frame | None) -> None:
        self.last_heard = None if frame is None else frame.copy()


class FileSource(Port):
    """A WAV file played into the talkgroup (announcements, test recordings)."""

    can_transmit = False

    def __init__(self, name: str, config: FileSourceConfig, timing: Timing) -> None:
        super().__init__(name, config, timing)
        self.schedule = Scheduler(config, self.rate)
        self.audio = np.zeros(0, np.float32)
        self.position = 0

    def open(self) -> None:
        """Read the file now: a missing one makes this port down (and retried), not the site."""
        self.audio = read_wav(self.config.path, self.rate)

    def read(self) -> Frame | None:
        on = self.schedule.advance(self.frame_samples)
        n = self.frame_samples
        if not on or (self.position >= len(self.audio) and not self.config.loop):
            self.talking = False
            return None
        if self.config.loop:
            idx = (self.position + np.arange(n)) % len(self.audio)
            frame = self.audio[idx]
        else:
            frame = np.zeros(n, np.float32)
            chunk = self.audio[self.position : self.position + n]
            frame[: len(chunk)] = chunk
        self.position += n
        self.talking = True
        return frame


def check_wav(path: str | Path) -> str:
    """What is wrong with a file a ``file`` port would play ("" when it plays)."""
    try:
        with wave.open(str(path), "rb") as wav:
            if wav.getsampwidth() != 2:
                return f"{path}: {8 * wav.getsampwidth()}-bit audio; save it as 16-bit PCM WAV"
    except FileNotFoundError:
        return f"{path}: no such file"
    except OSError as exc:
        return f"{path}: cannot read it ({exc.strerror or exc})"
    except (wave.Error, EOFError) as exc:
        return f"{path}: not a PCM WAV file ({exc}); save it as 16-bit PCM WAV"
    return ""


def read_wav(path: str | Path, rate: int) -> np.ndarray:
    """Load a 16-bit PCM WAV as float32 mono at ``rate`` (first channel)."""
    if problem := check_wav(path):
        raise OSError(problem)
    with wave.open(str(path), "rb") as wav:
        channels = wav.getnchannels()
        source_rate = wav.getframerate()
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    audio = int16_to_float(data[::channels])
    if source_rate != rate:  # a whole file at once: no stream state to carry
        audio = soxr.resample(audio, source_rate, rate)
    return audio.astype(np.float32)
