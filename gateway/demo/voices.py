"""What the demo's radios say: a WAV per radio, made at start.

With ``espeak-ng`` installed each radio speaks its line of the scenario in a voice
of its own; without it, each gets speech-like test audio (a gliding voiced
source through moving formants, ``gateway.codecs.tones.speech_like``) of the
same length, so the demo sounds like radio traffic either way.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
import zlib
from pathlib import Path

import numpy as np

from gateway.codecs.tones import speech_like

RATE = 16000


def make_voices(folder: Path, lines: dict[str, tuple[str, str]], seconds: float = 5.5) -> str:
    """``folder/PORT.wav`` for each ``PORT: (espeak voice, text)``; says how they were made."""
    folder.mkdir(parents=True, exist_ok=True)
    espeak = shutil.which("espeak-ng")
    for port, (voice, text) in lines.items():
        path = folder / f"{port}.wav"
        if espeak and _speak(espeak, voice, text, path):
            continue
        audio = speech_like(RATE, seconds, seed=zlib.crc32(port.encode()))
        _write_wav(path, audio)
    return "espeak-ng speech" if espeak else "speech-like audio (install espeak-ng for words)"


def _speak(espeak: str, voice: str, text: str, path: Path) -> bool:
    try:
        subprocess.run(
            [espeak, "-v", voice, "-s", "180", "-w", str(path), text],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return path.exists() and path.stat().st_size > 1000


def _write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(pcm.tobytes())
