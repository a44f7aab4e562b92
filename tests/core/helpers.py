"""A scripted endpoint for driving the engine tick by tick, and signal measures."""

from __future__ import annotations

import numpy as np

from gateway.config import PortConfig, Timing
from gateway.ports import Port

TIMING = Timing()
RATE = TIMING.rate
N = TIMING.frame_samples


class ScriptedPort(Port):
    """An endpoint whose talk state and audio the test sets, and which keeps what it got."""

    def __init__(self, name: str, tone_hz: float = 0.0, level: float = 0.25, **config) -> None:
        super().__init__(name, PortConfig(kind="scripted", **config), TIMING)
        self.tone_hz = tone_hz
        self.level = level
        self.talk = False
        self.sample = 0
        self.heard: list[np.ndarray | None] = []
        self.key_calls: list[bool] = []
        self.fail_reads = 0
        self.next_frame: np.ndarray | None = None
        self.gaps = 0  # ticks to come that it talks but hands no frame (a late packet)

    def read(self) -> np.ndarray | None:
        if self.fail_reads:
            self.fail_reads -= 1
            raise OSError("device went away")
        self.talking = self.talk
        t = (self.sample + np.arange(N)) / RATE
        self.sample += N
        if self.next_frame is not None:
            frame, self.next_frame = self.next_frame, None
            return frame
        if not self.talk:
            return None
        if self.gaps:
            self.gaps -= 1
            return None
        return (self.level * np.sin(2 * np.pi * self.tone_hz * t)).astype(np.float32)

    def write(self, frame: np.ndarray | None) -> None:
        self.heard.append(None if frame is None else frame.copy())

    def key(self, on: bool) -> None:
        super().key(on)
        self.key_calls.append(on)

    def recent_audio(self, frames: int) -> np.ndarray:
        got = [f if f is not None else np.zeros(N, np.float32) for f in self.heard[-frames:]]
        return np.concatenate(got)


def tone_level(audio: np.ndarray, hz: float) -> float:
    """Amplitude of the component at ``hz`` (a windowed DFT bin), linear."""
    t = np.arange(len(audio)) / RATE
    window = np.hanning(len(audio))
    probe = np.exp(-2j * np.pi * hz * t) * window
    return float(2 * abs(np.dot(audio, probe)) / window.sum())


def db(x: float) -> float:
    return 20 * np.log10(max(x, 1e-12))
