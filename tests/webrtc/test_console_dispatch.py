"""What a dispatcher hits in Chromium (issue #16): PTT that stays put, a frozen or restarted
gateway, monitor-only and emergency controls, pre-emption audio, unit labels, getStats.

Audio is checked by content (the fake microphone's 1200 Hz, the radio's 700 Hz, the
busy tone's 480/620 Hz), state by the gateway's own objects and its audit file.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from console_site import (
    CONSOLE_TONE_HZ,
    PASSWORDS,
    RADIO_TONE_HZ,
    console_site,
    fft_peak_hz,
    png_is_blank,
    run,
)

from tests.waiting import until

DOCS = Path(__file__).resolve().parents[2] / "docs"
LONG_NAME = "Alice Marie-Josephine Fitzgerald-Montgomery, Coast Guard Sector Puget Sound"


async def box(page, selector: str) -> dict:
    return await page.locator(selector).bounding_box()


async def press(page, selector: str) -> None:
    await page.locator(selector).hover()
    await page.mouse.down()


def test_ptt_button_never_moves_while_held(tmp_path):
    """A long talker name used to wrap, push PTT from under the pointer and drop the floor."""

    async def scenario():
        async with console_site(tmp_path, alice_name=LONG_NAME) as site:
            page = await site.console("alice")
            await site.wait_joined(page, "marine")
            ptt = '[data-talkgroup="marine"] .ptt'
            before = await box(page, ptt)
            await press(page, ptt)
            port = await until(lambda: site.console_port("alice", "marine"), 5, "alice's seat")
            await until(lambda: port.talking, 5, "alice to hold the floor")
            # Her own long name is now the talker, and a banner appears: neither may move
            # the button or release PTT.
            await (
                page.locator('[data-talkgroup="marine"] .talker')
                .filter(has_text="Fitzgerald")
                .wait_for(timeout=3000)
            )
            await page.evaluate("document.querySelector('#banner').textContent = 'x'")
            await page.evaluate("document.querySelector('#banner').classList.add('on')")
            for _ in range(40):  # hold for at least 40 ticks' worth of checks
                assert port.ptt, "PTT dropped while the button was held"
                await asyncio.sleep(0.02)
            assert await box(page, ptt) == before
            await page.mouse.up()
            await until(lambda: not port.ptt, 3, "PTT released on mouse up")

    run(scenario())


def test_frozen_gateway_is_shown_unreachable_within_3_s(tmp_path):
    """The heartbeat: a gateway that stops answering (here its event loop is blocked, as
    SIGSTOP would) is 'unreachable' within 3 s, and 'connected' again once it answers."""

    async def scenario():
        async with console_site(tmp_path) as site:
            page = await site.console("alice")
            await site.wait_joined(page, "marine")
            await page.locator("#link").filter(has_text="connected").wait_for(timeout=5000)
            frozen = time.time()
            time.sleep(5.0)  # the whole gateway (and this test) freezes for 5 s
            log = await page.evaluate("borderlink.log")
            seen = [e["t"] / 1000 for e in log if e.get("link") == "unreachable"]
            assert seen, f"the page never said unreachable: {[e for e in log if 'link' in e]}"
            delay = seen[0] - frozen
            print(f"frozen gateway → 'unreachable' after {delay * 1000:.0f} ms")
            assert delay <= 3.0
            await page.locator("#link").filter(has_text="connected").wait_for(timeout=10000)

    run(scenario())


def test_restart_leaves_a_clean_login_form(tmp_path):
    async def scenario():
        async with console_site(tmp_path) as site:
            page = await site.console("alice")
            await site.wait_joined(page, "marine")
            assert "Alice" in await page.locator("#who").inner_text()
            await site.restart()  # sessions are in memory: everyone must log in again
            await page.locator("#login").wait_for(state="visible", timeout=15000)
            await page.locator("#banner").wait_for(state="hidden", timeout=5000)
            assert (await page.locator("#who").inner_text()).strip() == ""
            assert await page.locator(".tile").count() == 0
            await page.fill("#password", "alice-secret-1")
            await page.fill("#operator", "alice")
            await page.click("#login button[type=submit]")
            await site.wait_joined(page, "marine")

    run(scenario())


def test_monitor_only_ptt_looks_disabled(tmp_path):
    async def scenario():
        async with console_site(tmp_path) as site:
            alice, bob = await site.console("alice"), await site.console("bob")
            await site.wait_joined(alice, "marine")
            await site.wait_joined(bob, "marine")

            async def look(page) -> dict:
                return await page.evaluate("""() => {
                    const b = document.querySelector('[data-talkgroup="marine"] .ptt');
                    const s = getComputedStyle(b);
                    return {opacity: Number(s.opacity), cursor: s.cursor, text: b.innerText,
                            bg: s.backgroundImage + s.backgroundColor}; }""")

            live, monitor = await look(alice), await look(bob)
            assert live["opacity"] == 1 and live["text"] == "PTT"
            assert monitor["opacity"] < 0.6, monitor
            assert monitor["cursor"] == "not-allowed" and "MONITOR ONLY" in monitor["text"]
            assert monitor["bg"] != live["bg"]

    run(scenario())


def test_emergency_is_guarded_and_away_from_ptt(tmp_path):
    """EMERG calls only when held a second, sits far from PTT (desktop and phone width),
    and raises an alarm on every console monitoring the talkgroup until acknowledged."""

    async def scenario():
        async with console_site(tmp_path) as site:
            page = await site.console("alice")
            bob = await site.console("bob")
            await site.wait_joined(page, "marine")
            await site.wait_joined(bob, "marine")
            tile = '[data-talkgroup="marine"]'
            for width in (1100, 390):
                await page.set_viewport_size({"width": width, "height": 800})
                e, p = await box(page, f"{tile} .emergency"), await box(page, f"{tile} .ptt")
                gap_y = max(p["y"] - (e["y"] + e["height"]), e["y"] - (p["y"] + p["height"]))
                gap_x = max(p["x"] - (e["x"] + e["width"]), e["x"] - (p["x"] + p["width"]))
                assert max(gap_x, gap_y) >= 48, f"EMERG {max(gap_x, gap_y):.0f} px from PTT"
            port = site.console_port("alice", "marine")
            await press(page, f"{tile} .emergency")  # a slip: let go after 0.3 s
            await asyncio.sleep(0.3)
            await page.mouse.up()
            for _ in range(60):  # well past the hold time: nothing was called
                assert not port.emergency and not port.ptt
                await asyncio.sleep(0.02)
            await press(page, f"{tile} .emergency")  # held: the emergency call goes out
            await until(lambda: port.emergency and port.talking, 5, "the emergency call")
            await page.mouse.up()
            await until(lambda: not port.emergency, 3, "the call to end on release")
            # The alarm stays on every console monitoring marine after the call ended.
            for p in (page, bob):
                await (
                    p.locator("#alarm.on")
                    .filter(has_text="EMERGENCY on marine")
                    .wait_for(timeout=3000)
                )
            DOCS.mkdir(exist_ok=True)
            await page.set_viewport_size({"width": 1100, "height": 700})
            shot = await page.screenshot(path=str(DOCS / "console-emergency.png"))
            assert not png_is_blank(shot)
            await bob.click("#alarm-ack")  # a monitor-only operator may acknowledge
            for p in (page, bob):
                await p.locator("#alarm").wait_for(state="hidden", timeout=3000)
            records = site.audit_records()
            acks = [r for r in records if r["event"] == "console_alarm_ack"]
            assert [r["operator"] for r in acks] == ["bob"] and acks[0]["talkgroup"] == "marine"
            raised = [r for r in records if r["event"] == "console_emergency" and r["on"]]
            assert len(raised) == 1  # the slip raised nothing
            over = page.locator('[data-talkgroup="marine"] .history li.emergency-over')
            assert "⚠ Alice (dispatch)" in await over.first.inner_text()  # marked in the history

    run(scenario())


def heard(site, port) -> bool:
    """The engine admits this port to its talkgroup's mix (it holds the floor)."""
    engine = site.gateway.engine
    ports = engine.ports
    return port in ports and bool(engine.admitted[ports.index(port)])


def test_console_preempted_by_an_emergency_hears_it_not_the_busy_tone(tmp_path):
    async def scenario():
        async with console_site(tmp_path, floor="single") as site:
            carol, alice = await site.console("carol"), await site.console("alice")
            await site.wait_joined(carol, "marine")
            await site.wait_joined(alice, "marine")
            await press(carol, '[data-talkgroup="marine"] .ptt')  # carol holds the floor
            mine = await until(lambda: site.console_port("carol", "marine"), 5, "carol's seat")
            await until(lambda: heard(site, mine), 5, "carol to hold the floor")
            await press(alice, '[data-talkgroup="marine"] .emergency')
            them = site.console_port("alice", "marine")
            await until(
                lambda: heard(site, them) and not heard(site, mine), 5, "alice to pre-empt carol"
            )
            assert mine.ptt  # carol still holds her PTT down

            async def hears_alice():
                m = await carol.evaluate("borderlink.measure('marine')")
                return m and abs(m["peakHz"] - CONSOLE_TONE_HZ) < 12 and m["rmsDbfs"] > -35 and m

            got = await until(hears_alice, 8, "carol to hear the emergency call's 1200 Hz")
            print(f"pre-empted console hears {got['peakHz']:.0f} Hz at {got['rmsDbfs']:.1f}")
            for _ in range(10):  # and keeps hearing it, never the busy tone
                m = await carol.evaluate("borderlink.measure('marine')")
                assert abs(m["peakHz"] - 480) > 12 and abs(m["peakHz"] - 620) > 12, m
                await asyncio.sleep(0.1)
            state = carol.locator('[data-talkgroup="marine"] .state')
            assert "EMERGENCY" in await state.inner_text()

    run(scenario())


def test_radios_are_shown_by_their_label(tmp_path):
    async def scenario():
        radio = 'label = "USCG 45612"'
        async with console_site(tmp_path, radio=radio) as site:
            page = await site.console("alice")
            await site.wait_joined(page, "marine")
            site.radio().open_squelch(True)
            talker = page.locator('[data-talkgroup="marine"] .talker')
            await talker.filter(has_text="USCG 45612 (USCG)").wait_for(timeout=5000)
            state = await page.evaluate("borderlink.lastState")
            who = state["talkgroups"][0]["talkers"][0]
            assert who["port"] == "uscg_vhf" and who["label"] == "USCG 45612"
            site.radio().open_squelch(False)
            await until(
                lambda: any(
                    r["event"] == "talk" and r.get("label") == "USCG 45612"
                    for r in site.audit_records(prefix="")
                ),
                5,
                "the over in the audit log with the radio's label",
            )
            # A console's over carries the operator's display name.
            await press(page, '[data-talkgroup="marine"] .ptt')
            await until(lambda: site.console_port("alice", "marine").talking, 5, "alice talks")
            await page.mouse.up()
            await until(
                lambda: any(
                    r["event"] == "talk" and r.get("label") == "Alice (dispatch)"
                    for r in site.audit_records(prefix="")
                ),
                5,
                "alice's over audited with her display name",
            )

    run(scenario())


def test_working_console_reports_its_audio_level_in_getstats(tmp_path):
    async def scenario():
        async with console_site(tmp_path) as site:
            page = await site.console("alice")
            await site.wait_joined(page, "marine")
            site.radio().open_squelch(True)

            async def hears_radio():
                m = await page.evaluate("borderlink.measure('marine')")
                return m and abs(m["peakHz"] - RADIO_TONE_HZ) < 12 and m["rmsDbfs"] > -30

            await until(hears_radio, 8, "the page to hear the radio")

            async def level():
                return await page.evaluate("""async () => {
                    const s = await borderlink.tiles.get('marine').pc.getStats();
                    let r = null;
                    s.forEach(x => { if (x.type === 'inbound-rtp') r = x; });
                    return r && r.audioLevel > 0.05 && r; }""")

            stats = await until(level, 5, "a non-zero audioLevel in getStats")
            print(f"getStats audioLevel {stats['audioLevel']:.3f}")

    run(scenario())


def test_ptt_messages_are_rate_limited(tmp_path):
    """500 PTT toggles from one page: a bounded number reach the floor and the audit log,
    the rest are refused and counted in a few audit records."""

    async def scenario():
        async with console_site(tmp_path) as site:
            page = await site.console("alice")
            await site.wait_joined(page, "marine")
            started = time.monotonic()
            # A second socket on the same console (as a script in the page could open).
            await page.evaluate("""() => new Promise((resolve) => {
                const ws = new WebSocket(`ws://${location.host}/api/console/events`);
                ws.onopen = () => {
                    ws.send(JSON.stringify({type: 'hello', console: borderlink.consoleId}));
                    for (let i = 0; i < 500; i++)
                        ws.send(JSON.stringify({type: 'ptt', talkgroup: 'marine',
                                                on: i % 2 === 0}));
                    ws.send(JSON.stringify({type: 'ptt', talkgroup: 'marine', on: false}));
                    setTimeout(resolve, 200);
                };
            })""")
            hub = site.gateway.console
            await until(lambda: hub.ptt_rate_limited > 0, 5, "presses refused by the limit")
            await until(
                lambda: any(r["event"] == "console_ptt_rate_limited" for r in site.audit_records()),
                5,
                "the refusal audited",
            )
            elapsed = time.monotonic() - started
            ptt = [r for r in site.audit_records() if r["event"] == "console_ptt"]
            allowed = 20 + 5 * elapsed  # PTT_BURST + PTT_RATE per second: the design's bound
            assert len(ptt) <= 2 * allowed + 2, f"{len(ptt)} PTT audit lines in {elapsed:.1f} s"
            limited = [r for r in site.audit_records() if r["event"] == "console_ptt_rate_limited"]
            assert len(limited) <= 1 + elapsed / 5 + 1
            assert not site.console_port("alice", "marine").ptt  # the last release went through

    run(scenario())


def test_metrics_have_no_operator_names_and_no_series_per_session(tmp_path):
    async def scenario():
        import aiohttp

        async with console_site(tmp_path) as site:
            base = site.url.removesuffix("/console/")

            async def series() -> set[str]:
                async with aiohttp.ClientSession() as http:
                    text = await (await http.get(f"{base}/metrics")).text()
                assert "alice" not in text.lower() and "Alice" not in text
                return {
                    x.rsplit(" ", 1)[0]
                    for x in text.splitlines()
                    if not x.startswith("#") and "_seconds" not in x
                }

            page = await site.console("alice")
            await site.wait_joined(page, "marine")
            first = await series()
            assert (
                'borderlink_console_talkgroup_seats{talkgroup="marine",state="listening"}' in first
            )
            await page.reload()  # a new console page: new seats
            await site.wait_joined(page, "marine")
            other = await site.console("alice")  # and a second session
            await site.wait_joined(other, "marine")
            second = await series()
            port_series = {s for s in second - first if "port" in s.split("{")[0]}
            assert not port_series, port_series

    run(scenario())


def test_ptt_by_touch_on_a_phone_holds_and_talks(tmp_path):
    """A finger held on PTT at phone width (Chromium's own touch input, not a mouse):
    keyed for as long as it is held, the console's tone reaches the radio, and lifting
    the finger frees the floor."""

    async def scenario():
        async with console_site(tmp_path) as site:
            context = await site.browser.new_context(
                viewport={"width": 390, "height": 800}, has_touch=True, is_mobile=True
            )
            page = await context.new_page()
            await page.goto(site.url)
            await page.fill("#operator", "alice")
            await page.fill("#password", PASSWORDS["alice"])
            await page.locator("#login button[type=submit]").tap()
            await site.wait_joined(page, "marine")
            ptt = await box(page, '[data-talkgroup="marine"] .ptt')
            finger = [{"x": ptt["x"] + ptt["width"] / 2, "y": ptt["y"] + ptt["height"] / 2}]
            touch = await context.new_cdp_session(page)
            await touch.send(
                "Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": finger}
            )
            port = site.console_port("alice", "marine")
            await until(lambda: port.ptt, 5, "PTT keyed by the finger")
            pressed = time.time()
            rate = site.gateway.config.timing.rate
            await until(
                lambda: len(site.radio().audio_since(pressed)) >= 2 * rate,
                10,
                "2 s of the console's audio at the radio",
            )
            assert port.ptt, "PTT dropped while the finger was held"
            peak = fft_peak_hz(site.radio().audio_since(pressed)[-rate:], rate)
            assert abs(peak - CONSOLE_TONE_HZ) < 10, peak
            await touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
            await until(lambda: not port.ptt, 3, "PTT released with the finger")
            await context.close()

    run(scenario())
