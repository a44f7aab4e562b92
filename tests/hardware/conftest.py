"""Fixtures for radio tests: a uniquely named JACK dummy server, and JACK radio simulators."""

from __future__ import annotations

import os

import pytest

from tests.conftest import require_binary
from tests.hardware.jackradio import RadioSim, portaudio_off, portaudio_on, start_jackd, stop_jackd


@pytest.fixture(scope="session")
def jack_server():
    """Name of a running JACK dummy server at 48 kHz / 256 frames, PortAudio pointed at it."""
    require_binary("jack_lsp")
    name = f"bltest{os.getpid()}"
    proc = start_jackd(name)
    try:
        portaudio_on(name)
        yield name
    finally:
        portaudio_off()
        stop_jackd(proc)


@pytest.fixture
def radio_sim(jack_server):
    sims: list[RadioSim] = []

    def make(radios: int, seconds: float = 20.0) -> RadioSim:
        sim = RadioSim(jack_server, radios, seconds)
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        sim.close()
