"""Shared test helpers: real components or a clear failure in CI, free loopback ports."""

from __future__ import annotations

import collections
import os
import random
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
    missing(name)
    return ""


def missing(name: str) -> None:
    """A component the test needs is not here: in CI the test fails; locally it skips."""
    message = f"{name} is not installed; run 'bash .ci/bootstrap setup' to install it"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


# Test servers and phones listen on ports from here: below baresip's RTP range
# (10000-20000), the gateway's in tests (20000-31999) and the kernel's ephemeral range
# (32768-60999). A port taken from the ephemeral range (bind to port 0) can be handed
# to an outgoing TCP connection before the server that was to use it binds it: baresip
# then failed with "Address already in use" on its SIP/TCP socket.
TEST_PORTS = range(3000, 10000)


# Ports handed out lately: a test picks all its ports before it starts anything, so
# "free right now" alone could give two of its servers the same one.
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=2000)


def free_port(pair: bool = False) -> int:
    """A port on 127.0.0.1 free right now for both UDP and TCP (and its neighbour, with
    ``pair``: baresip binds sip_listen + 1 too), and not handed out lately."""
    for _ in range(200):
        port = random.choice(TEST_PORTS[:-1])
        ports = (port, port + 1) if pair else (port,)
        if any(p in _HANDED_OUT for p in ports):
            continue
        if all(_bindable(p) for p in ports):
            _HANDED_OUT.extend(ports)
            return port
    raise RuntimeError(f"no free port in {TEST_PORTS}")


def _bindable(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """A mono 16-bit WAV that a peer (baresip, Chromium's fake microphone) plays."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(float_to_int16(samples).astype("<i2").tobytes())
    return path
