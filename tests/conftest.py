"""Shared test helpers: real components or a clear failure in CI, free loopback ports."""

from __future__ import annotations

import os
import shutil
import socket
import wave
from pathlib import Path

import numpy as np
import pytest
from gateway.codecs.pcm import float_to_int16

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str) -> str:
    """Path of a program the test needs. In CI a missing one fails the test; locally it skips."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if path:
        return path
    message = f"{name} is not installed; run 'bash .ci/bootstrap setup' to install it"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port on 127.0.0.1 that is free right now (UDP by default)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """A mono 16-bit WAV that a peer (baresip, Chromium's fake microphone) plays."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(float_to_int16(samples).astype("<i2").tobytes())
    return path
