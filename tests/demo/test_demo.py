"""``borderlink demo`` end to end, as a newcomer would meet it, in a headless Chromium.

The demo runs as its own process (two gateway processes under it) for a bounded
time. The browser opens the Canadian console with the operator and password the
demo printed, and must hear the U.S. cutter's voice across the link — checked by
its content: speech energy in the voice band while the cutter talks and no
Canadian radio does — then hear nothing while the scenario's cut is in force and
the cutter talks again. Both gateways must stop cleanly by themselves. Each
console is photographed during the scenario for the README (docs/demo-*.png).
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "webrtc"))
from console_site import CHROMIUM_FLAGS, png_is_blank  # noqa: E402

from gateway.demo.sites import Status, parse_metrics  # noqa: E402
from tests.conftest import require_binary  # noqa: E402
from tests.waiting import until

DOCS = Path(__file__).resolve().parents[2] / "docs"
SECONDS = 68  # startup, then the scenario to the restore at 60 s (config/demo/*.toml)
SPEECH_DBFS = -40.0  # the cutter's voice at the console is well above this...
SILENT_DBFS = -60.0  # ...and a cut link leaves the console below this


class Demo:
    """The ``borderlink demo`` process and what it printed."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "demo", "--seconds", str(SECONDS), "--plain"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            print("[demo]", line.rstrip())
            self.lines.append(line.rstrip())

    def find(self, pattern: str) -> re.Match | None:
        return next((m for line in self.lines if (m := re.search(pattern, line))), None)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


async def status(session: aiohttp.ClientSession, url: str) -> Status:
    """The site as its /metrics shows it (nothing, once the demo has ended)."""
    try:
        async with session.get(f"{url}/metrics") as reply:
            return parse_metrics(await reply.text())
    except (aiohttp.ClientError, TimeoutError):
        return Status()


async def login(browser, url: str, operator: str, password: str):  # noqa: ANN001
    context = await browser.new_context(viewport={"width": 1000, "height": 700})
    page = await context.new_page()
    await page.goto(f"{url}/console/")
    await page.fill("#operator", operator)
    await page.fill("#password", password)
    await page.click("#login button[type=submit]")
    await page.wait_for_function(
        """tg => { const t = window.borderlink && window.borderlink.tiles.get(tg);
                   return t && t.pc && t.pc.connectionState === 'connected' && t.analyser; }""",
        arg="marine",
        timeout=30_000,
    )
    return page


class Ear:
    """The console's marine tile, measured ten times a second and stamped with the time,
    from login to the end (a busy machine answers /metrics late; the ear keeps going)."""

    def __init__(self, page) -> None:  # noqa: ANN001
        self.samples: list[tuple[float, dict]] = []
        self.task = asyncio.ensure_future(self._run(page))

    async def _run(self, page) -> None:  # noqa: ANN001
        while True:
            if measured := await page.evaluate("borderlink.measure('marine')"):
                self.samples.append((time.monotonic(), measured))
            await asyncio.sleep(0.1)

    def during(self, intervals: list[tuple[float, float]], delay: float = 0.2) -> list[dict]:
        """Samples inside the intervals, shifted by the path's delay to the browser."""
        return [
            m for t, m in self.samples if any(a + delay <= t <= b + delay for a, b in intervals)
        ]


async def one_over(session, us_url: str, ca_url: str, on_air, on_first=None):  # noqa: ANN001
    """Poll both sites until ``on_air(us, ca)`` has held and ended (one over). An over is
    one stretch of time, so it certainly ran from the end of the first poll that saw it to
    the start of the last one (a poll's answer is from some instant while it ran)."""
    first_end = last_start = None
    side_tasks = []  # on_first runs beside the polls, which must go on meanwhile
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        start = time.monotonic()
        us, ca = await asyncio.gather(status(session, us_url), status(session, ca_url))
        if on_air(us, ca):
            if first_end is None:
                first_end = time.monotonic()
                if on_first is not None:
                    side_tasks.append(asyncio.ensure_future(on_first()))
            last_start = start
        elif first_end is not None:
            if last_start > first_end:
                await asyncio.gather(*side_tasks)
                return [(first_end, last_start)]
            first_end = None  # seen by one poll only: too short to judge; wait for more
        await asyncio.sleep(0.1)
    raise AssertionError("no over seen on air from start to end")


async def link_figures(session: aiohttp.ClientSession, url: str) -> str:
    """The site's link and link-leg series from /metrics (packets, late, concealed…)."""
    async with session.get(f"{url}/metrics") as reply:
        text = await reply.text()
    return "\n".join(
        line
        for line in text.splitlines()
        if line.startswith(("borderlink_link_", "borderlink_sip_route_"))
    )


def talking(st: Status, port: str) -> bool:
    return bool(st.ports.get(port, {}).get("talking"))


@pytest.mark.slow
def test_demo_two_sites_a_console_hears_across_the_border_and_the_cut_silences_it():
    chromium = require_binary("chromium")
    from playwright.async_api import async_playwright

    demos: list[Demo] = []

    async def scenario(browser, session: aiohttp.ClientSession) -> None:  # noqa: ANN001
        demo = demos[0]
        printed = await until(lambda: demo.find(r"password: (\S+)"), 90, "the demo's credentials")
        printed_at = time.monotonic()
        password = printed.group(1)
        ca_url = demo.find(r"CA .* console (http://127\.0\.0\.1:\d+)/console/").group(1)
        us_url = demo.find(r"US .* console (http://127\.0\.0\.1:\d+)/console/").group(1)
        operator = demo.find(r"operator: (\S+)").group(1)

        async def hear_and_cut(session, ca_page, us_login, ear: Ear) -> None:  # noqa: ANN001
            # 1. The U.S. cutter talks (and no Canadian marine radio): Canada hears its voice.
            async def photograph_ca() -> None:
                await asyncio.sleep(1.0)  # a syllable or two on the meters
                shot = await ca_page.screenshot(path=str(DOCS / "demo-ca.png"), full_page=True)
                assert not png_is_blank(shot)

            spans = await one_over(
                session,
                us_url,
                ca_url,
                lambda us, ca: (
                    talking(us, "uscg_cutter")
                    and ca.link_state == "up"
                    and not talking(ca, "rcmp_marine")
                ),
                photograph_ca,
            )
            heard = ear.during(spans)
            loud = [m for m in heard if m["rmsDbfs"] > SPEECH_DBFS]
            loudest = max((m["rmsDbfs"] for m in heard), default=-200.0)
            print(
                f"CA console while the cutter talks: {len(loud)}/{len(heard)} samples "
                f"above {SPEECH_DBFS} dBFS, loudest {loudest:.1f}"
            )
            assert len(heard) >= 10, f"too little of the over was seen: {spans}"
            if len(loud) < len(heard) // 4:  # what each side's link leg did, to find out why
                for url in (ca_url, us_url):
                    print(url, await link_figures(session, url))
            assert len(loud) >= len(heard) // 4, "the Canadian console did not hear the cutter"
            voiced = [m["peakHz"] for m in loud]
            # Speech: its loudest partials mostly where voices have them (fricatives reach
            # 5 kHz: the link speaks wideband Opus and the engine runs at 16 kHz).
            assert 80 <= statistics.median(voiced) <= 1500, f"not a voice: {voiced}"

            # 2. During the cross-border patch the emergency pre-empts CBSA (still keyed,
            #    no longer heard) and is heard in the U.S.; seen from the U.S. console.
            # Each side's part is noted when a poll sees it (both sites polled at once): on
            # a loaded machine a /metrics answer takes long, and the pre-emption lasts 4 s.
            seen = {"preempted in CA": False, "heard in the U.S.": False}

            async def emergency_heard_in_the_us() -> bool:
                us, ca = await asyncio.gather(status(session, us_url), status(session, ca_url))
                emergency = talking(ca, "rcmp_dispatch") and "land" in ca.patched
                cbsa = ca.ports.get("cbsa_land", {})
                if emergency and cbsa.get("squelch_open") and not cbsa.get("talking"):
                    seen["preempted in CA"] = True
                if emergency and us.talkers.get("marine", 0) > 0:
                    seen["heard in the U.S."] = True
                return all(seen.values())

            us_page = await us_login
            try:
                await until(
                    emergency_heard_in_the_us, 60, "the emergency across the patch", interval=0.2
                )
            except AssertionError as timeout:
                raise AssertionError(f"{timeout}; seen: {seen}") from None
            await asyncio.sleep(1.0)  # a syllable or two on the meters
            shot = await us_page.screenshot(path=str(DOCS / "demo-us.png"), full_page=True)
            assert not png_is_blank(shot)

            # 3. The U.S. cuts the link; Canada sees "cut by peer" and hears nothing of the
            #    cutter's next over.
            def cutter_talks_while_cut(us: Status, ca: Status) -> bool:
                return (
                    talking(us, "uscg_cutter")
                    and us.link_state == "cut"
                    and ca.link_state == "cut_by_peer"
                )

            spans = await one_over(session, us_url, ca_url, cutter_talks_while_cut)
            heard = ear.during(spans)
            assert len(heard) >= 10, f"too little of the over was seen: {spans}"
            loudest = max(m["rmsDbfs"] for m in heard)
            print(f"CA console while the link is cut: loudest {loudest:.1f} dBFS")
            assert loudest < SILENT_DBFS, f"the cut link still carried {loudest:.1f} dBFS"

        # The cutter's first over starts 10 s into the demo: both consoles log in at once
        # (the U.S. one is needed only for its photograph, later) so a loaded machine
        # has the Canadian one listening in time.
        us_login = asyncio.ensure_future(login(browser, us_url, operator, password))
        try:
            ca_page = await login(browser, ca_url, operator, password)
            print(
                f"CA console listening {time.monotonic() - printed_at:.1f} s after the "
                "demo printed its credentials"
            )
            ear = Ear(ca_page)  # listening from the first moment
            try:
                await hear_and_cut(session, ca_page, us_login, ear)
            finally:
                ear.task.cancel()
        finally:
            us_login.cancel()

    async def main() -> None:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            async_playwright() as pw,
        ):
            # The browser starts before the demo: its launch is the slow part on a busy machine.
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            demos.append(Demo())
            await scenario(browser, session)
            await browser.close()

    try:
        asyncio.run(main())
        demos[0].process.wait(SECONDS + 60)
    finally:
        if demos:
            demos[0].stop()
    demo = demos[0]
    assert demo.process.returncode == 0, "\n".join(demo.lines[-30:])
    assert demo.find(r"US \] link ca: CUT here"), "the cut was not narrated"
    assert demo.find(r"CA \] link us: CUT BY PEER")
    for key in ("CA", "US"):
        stopped = demo.find(rf"{key} gateway \(pid (\d+)\): stopped cleanly")
        assert stopped, f"the {key} gateway did not stop cleanly"
        with pytest.raises(ProcessLookupError):
            os.kill(int(stopped.group(1)), 0)
