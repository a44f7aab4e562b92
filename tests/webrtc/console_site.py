"""A real gateway with the console, and a real Chromium driven by Playwright.

Each test runs one asyncio loop (``run``) holding the gateway (its real web
server on 127.0.0.1, port 0) and Playwright's async API. Chromium's microphone is
a WAV this fixture writes (a known tone), so what reaches a radio can be checked
by frequency. The radio here is a ``test_radio`` port: squelch set by the test,
a known tone out, and every frame the gateway sends it kept with its arrival time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import zlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from gateway.codecs.tones import ToneGenerator
from pydantic import Field

from gateway.config import PortConfig
from gateway.endpoints import ENDPOINTS, Endpoint
from gateway.ports import Port
from gateway.webrtc.passwords import hash_password
from tests import waiting
from tests.conftest import require_binary, write_wav

CONSOLE_TONE_HZ = 1200.0  # what the fake microphone says
RADIO_TONE_HZ = 700.0  # what the test radio says
PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22", "carol": "carol-secret-3"}
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]

_HASHES: dict[str, str] = {}


def password_hash(operator: str) -> str:
    if operator not in _HASHES:  # scrypt is slow on purpose; hash once per session
        _HASHES[operator] = hash_password(PASSWORDS[operator])
    return _HASHES[operator]


class TestRadioConfig(PortConfig):
    default_duplex: ClassVar[str] = "half"
    tone_hz: float = Field(RADIO_TONE_HZ, gt=0)
    level_dbfs: float = -12.0


class TestRadio(Port):
    """A radio the test keys by hand; records what the gateway transmits to it."""

    def __init__(self, name: str, config: TestRadioConfig, timing: Any) -> None:
        super().__init__(name, config, timing)
        self.tone = ToneGenerator([config.tone_hz], self.rate, config.level_dbfs)
        self.squelch = False
        self.opened_at: float | None = None
        self.heard: list[tuple[float, np.ndarray]] = []

    def open_squelch(self, on: bool) -> None:
        self.squelch = on
        self.opened_at = None

    def read(self) -> np.ndarray | None:
        if self.squelch and self.opened_at is None:
            self.opened_at = time.time()
        self.talking = self.squelch
        return self.tone.read(self.frame_samples) if self.squelch else None

    def write(self, frame: np.ndarray | None) -> None:
        if frame is not None and len(self.heard) < 3000:
            self.heard.append((time.time(), frame.copy()))

    def audio_since(self, t: float) -> np.ndarray:
        frames = [f for when, f in self.heard if when >= t]
        return np.concatenate(frames) if frames else np.zeros(0, np.float32)


TEST_ENDPOINTS = (
    *ENDPOINTS,
    Endpoint("test radio", ports={"console_test_radio": (TestRadioConfig, TestRadio)}),
)


def write_tone_wav(path: Path, hz: float, seconds: float = 20.0, rate: int = 48000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    audio = (10 ** (-12 / 20) * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return write_wav(path, audio, rate)


def site_toml(
    floor: str = "mix",
    extra: str = "",
    audit: Path | None = None,
    console: str = "",
    web: str = "",
    alice_name: str = "Alice (dispatch)",
    radio: str = "",
) -> str:
    audit_section = f'[audit]\npath = "{audit}"\nsync_every = "100ms"' if audit else ""
    return f"""
[site]
name = "Test station"
country = "US"

{audit_section}

[web]
host = "127.0.0.1"
port = 0
{web}

[console]
ice_addresses = ["127.0.0.1"]
login_attempts = 3
login_lockout = "30s"
disconnect_grace = "1s"
{console}

[console.operators.alice]
password_hash = "{password_hash("alice")}"
agency = "USCG"
display_name = "{alice_name}"
talk = ["*"]
emergency = true
patch = true

[console.operators.bob]
password_hash = "{password_hash("bob")}"
agency = "RCMP"
monitor = ["marine"]

[console.operators.carol]
password_hash = "{password_hash("carol")}"
agency = "CBSA"
display_name = "Carol"
talk = ["marine"]
patch = true

[ports.uscg_vhf]
kind = "console_test_radio"
agency = "USCG"
ptt_hang_time = "0ms"
{radio}

[ports.cbsa_land]
kind = "console_test_radio"
agency = "CBSA"
tone_hz = 500
ptt_hang_time = "0ms"

[talkgroups.marine]
members = ["uscg_vhf"]
floor = "{floor}"
description = "Shiprider working channel"
{extra}

[talkgroups.land]
members = ["cbsa_land"]
floor = "single"
"""


def fft_peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def png_is_blank(png: bytes) -> bool:
    """True for a PNG whose pixels are (nearly) all one colour, or that is not a PNG."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        return True
    pos, idat = 8, b""
    while pos < len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        kind = png[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += png[pos + 8 : pos + 8 + length]
        pos += 12 + length
    pixels = np.frombuffer(zlib.decompress(idat), np.uint8)
    return len(np.unique(pixels)) < 16 or float(pixels.std()) < 5.0


def rms_dbfs(x: np.ndarray) -> float:
    return 20 * float(np.log10(max(float(np.sqrt(np.mean(np.square(x)))), 1e-9)))


@dataclass
class Site:
    gateway: Any
    url: str
    browser: Any
    tmp: Path
    pages: list[Any] = field(default_factory=list)
    task: Any = None

    async def restart(self) -> None:
        """Stop the gateway and start it again on the same port (sessions are lost)."""
        from gateway.app import Gateway
        from gateway.config import load_config

        port = self.gateway.web.port
        self.gateway.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 10)
        path = self.tmp / "site.toml"
        path.write_text(path.read_text().replace("port = 0", f"port = {port}", 1))
        self.gateway = Gateway(load_config(path, TEST_ENDPOINTS))
        self.task = asyncio.ensure_future(self.gateway.run())
        await waiting.until(
            lambda: getattr(getattr(self.gateway, "web", None), "port", None) or self.task.done(),
            10,
            "the web server to listen again",
        )
        if self.task.done():
            self.task.result()

    def audit_records(self, prefix: str = "console_") -> list[dict[str, Any]]:
        """The site's real audit file, console records only."""
        path = self.tmp / "audit.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [r for r in map(json.loads, lines) if r["event"].startswith(prefix)]

    def radio(self, name: str = "uscg_vhf") -> TestRadio:
        return self.gateway.ports[name]

    async def console(self, operator: str = "alice", password: str | None = None) -> Any:
        """A new browser tab, logged in, with every permitted talkgroup joined."""
        context = await self.browser.new_context(viewport={"width": 1100, "height": 700})
        page = await context.new_page()
        page.on("console", lambda m: print("[page]", m.text))
        self.pages.append(page)
        await page.goto(self.url)
        await page.fill("#operator", operator)
        await page.fill("#password", password or PASSWORDS[operator])
        await page.click("#login button[type=submit]")
        return page

    async def wait_joined(self, page: Any, talkgroup: str, timeout: float = 15.0) -> None:
        """Until the page's peer connection for the talkgroup is connected and audio flows."""
        await page.wait_for_function(
            """tg => { const t = window.borderlink && window.borderlink.tiles.get(tg);
                       return t && t.pc && t.pc.connectionState === 'connected' && t.analyser; }""",
            arg=talkgroup,
            timeout=timeout * 1000,
        )

    def console_port(self, operator: str, talkgroup: str) -> Any:
        prefix = f"{operator}@{talkgroup}/"
        return next((p for p in self.gateway.engine.ports if p.name.startswith(prefix)), None)


@contextlib.asynccontextmanager
async def console_site(
    tmp: Path,
    floor: str = "mix",
    extra: str = "",
    browser: bool = True,
    console: str = "",
    web: str = "",
    browser_args: tuple[str, ...] = (),
    alice_name: str = "Alice (dispatch)",
    radio: str = "",
) -> AsyncIterator[Site]:
    from playwright.async_api import async_playwright

    from gateway.app import Gateway
    from gateway.config import load_config

    chromium = require_binary("chromium") if browser else ""
    config_path = tmp / "site.toml"
    config_path.write_text(
        site_toml(
            floor,
            extra,
            audit=tmp / "audit.jsonl",
            console=console,
            web=web,
            alice_name=alice_name,
            radio=radio,
        )
    )
    wav = write_tone_wav(tmp / "mic.wav", CONSOLE_TONE_HZ)
    gateway = Gateway(load_config(config_path, TEST_ENDPOINTS))
    run = asyncio.ensure_future(gateway.run())
    site: Site | None = None
    try:
        await waiting.until(
            lambda: getattr(getattr(gateway, "web", None), "port", None) or run.done(),
            10,
            "the web server to listen",
        )
        if run.done():
            run.result()
        scheme = "https" if "tls_certificate" in web else "http"
        url = f"{scheme}://127.0.0.1:{gateway.web.port}/console/"
        if not browser:
            site = Site(gateway, url, None, tmp, task=run)
            yield site
            return
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=chromium,
                args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}", *browser_args],
            )
            try:
                site = Site(gateway, url, browser, tmp, task=run)
                yield site
            finally:
                await browser.close()
    finally:
        if site is not None:  # a restart replaced the gateway
            gateway, run = site.gateway, site.task
        gateway.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(run, 10)


def run(coro: Awaitable[Any]) -> Any:
    """Run one scenario on a fresh loop (the gateway and Playwright share it)."""
    return asyncio.run(coro)
