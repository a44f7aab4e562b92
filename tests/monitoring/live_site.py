"""Run a real gateway (media clock, web server, services) inside a test's event loop.

Shared by tests/monitoring and tests/mqtt. Everything is polled for with a
bounded timeout, never slept for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np

from gateway.app import Gateway
from gateway.config import PortConfig, Timing, load_config
from gateway.ports import Port
from tests import waiting
from tests.conftest import free_port, require_binary  # noqa: F401  (re-exported)


@contextlib.asynccontextmanager
async def live_site(tmp_path: Path, toml: str) -> AsyncIterator[Gateway]:
    """A gateway built from ``toml`` and running; stopped (ports closed) on exit."""
    path = tmp_path / "site.toml"
    path.write_text(toml)
    gw = Gateway(load_config(path))
    task = asyncio.create_task(gw.run())
    try:
        await waiting.until(
            lambda: gw.clock.ticks > 2 or task.done(), 10, "the media clock to tick"
        )
        if task.done():
            task.result()
        if gw.config.section("web") is not None:
            await waiting.until(
                lambda: bool(getattr(gw, "web", None) and gw.web.port), 10, "the web server"
            )
        yield gw
    finally:
        gw.stop()
        await asyncio.wait_for(task, timeout=10)


async def http_get(gw: Gateway, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{gw.web.port}{path}") as response,
    ):
        return response.status, await response.text()


def free_tcp_port() -> int:
    return free_port()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop one process we started, by its PID; escalate to SIGKILL if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


class Probe(Port):
    """A listen-only port the test attaches to a talkgroup; it keeps what it was sent."""

    kind = "probe"
    can_talk = False

    def __init__(self, name: str, timing: Timing) -> None:
        super().__init__(name, PortConfig(kind="probe"), timing)
        self.heard: list[np.ndarray] = []

    def write(self, frame: np.ndarray | None) -> None:
        self.heard.append(
            np.zeros(self.frame_samples, np.float32) if frame is None else frame.copy()
        )

    def recent(self, frames: int) -> np.ndarray:
        got = self.heard[-frames:]
        return np.concatenate(got) if got else np.zeros(0, np.float32)


def dominant_hz(audio: np.ndarray, rate: int) -> float:
    """Frequency of the strongest FFT bin (Hann window)."""
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[int(np.argmax(spectrum))])


def rms_dbfs(audio: np.ndarray) -> float:
    return float(20 * np.log10(max(float(np.sqrt(np.mean(np.square(audio)))), 1e-9)))
