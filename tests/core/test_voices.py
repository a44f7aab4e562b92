"""Recorded audio in simulated sources: a WAV at any rate, and a radio's spoken message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import RATE, TIMING

from gateway.config import FileSourceConfig, SimulatedRadioConfig
from gateway.ports import FileSource, SimulatedRadio
from tests.conftest import write_wav


def peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * RATE / len(x))


def tone(hz: float, seconds: float, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_a_file_at_another_rate_plays_at_its_own_pitch_and_length(tmp_path: Path) -> None:
    # espeak-ng writes 22050 Hz: the file port must resample it, not fail or shift it.
    wav = write_wav(tmp_path / "msg.wav", tone(440, 1.0, 22050), 22050)
    port = FileSource("f", FileSourceConfig(kind="file", path=wav, loop=False), TIMING)
    port.open()
    audio = np.concatenate([port.read() for _ in range(50)])  # one second of ticks
    assert abs(peak_hz(audio) - 440) < 5
    assert abs(len(port.audio) - RATE) <= 2


def test_a_radio_says_its_message_from_the_start_of_every_burst(tmp_path: Path) -> None:
    message = np.concatenate([tone(500, 0.2, 16000), tone(1500, 0.2, 16000)])
    wav = write_wav(tmp_path / "voice.wav", message, 16000)
    config = SimulatedRadioConfig(
        kind="simulated_radio", voice=wav, talk_every="2s", talk_for="1s", level_dbfs=-6
    )
    radio = SimulatedRadio("r", config, TIMING)
    radio.open()
    for burst in range(2):
        frames = [radio.read() for _ in range(100)]  # two seconds: a burst, then quiet
        talking = [f is not None for f in frames]
        assert talking == [True] * 50 + [False] * 50, f"burst {burst}"
        said = np.concatenate(frames[:50])
        assert abs(peak_hz(said[:3200]) - 500) < 10  # the message's start, each time
        assert abs(peak_hz(said[3200:6400]) - 1500) < 10
        assert np.max(np.abs(said[:6400])) > 0.4  # peak at -6 dBFS
        assert not np.any(said[6400:]), "after the message the squelch stays open, silent"
