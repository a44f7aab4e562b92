"""A reload changes operators' rights at once: in a real Chromium and over the HTTP/WS API.

The reload is the gateway's own (``Gateway.reload``, what SIGHUP and ``run --watch``
call) on an edited site file; nothing in the console is poked directly.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from console_site import CONSOLE_TONE_HZ, PASSWORDS, console_site, fft_peak_hz, run

from gateway.webrtc.passwords import hash_password
from tests.waiting import until

RATE = 16000
ALICE_TALKS = 'talk = ["*"]\nemergency = true'


def reload_with(site, edit) -> None:
    path = site.tmp / "site.toml"
    text = path.read_text()
    new = edit(text)
    assert new != text, "the edit changed nothing"
    path.write_text(new)
    result = site.gateway.reload(path)
    assert result.ok, result.error


def test_reload_turns_a_talker_monitor_only_then_logs_her_out(tmp_path):
    async def scenario():
        async with console_site(tmp_path) as site:
            radio = site.radio()
            page = await site.console("alice")
            await site.wait_joined(page, "marine")
            await site.wait_joined(page, "land")
            marine = site.console_port("alice", "marine")
            stops: list[float] = []
            site.gateway.engine.listeners.append(
                lambda e: (
                    stops.append(time.time())
                    if e.kind == "talk_stop" and e.port == marine.name
                    else None
                )
            )
            pressed = time.time()
            await page.locator('[data-talkgroup="marine"] .ptt').hover()
            await page.mouse.down()
            await until(
                lambda: len(radio.audio_since(pressed)) >= RATE,
                10,
                "a second of the console's audio at the radio",
            )
            heard = radio.audio_since(pressed)[-RATE // 2 :]
            assert abs(fft_peak_hz(heard, RATE) - CONSOLE_TONE_HZ) < 10

            # alice may now only monitor marine, and may not use land at all.
            reloaded = time.time()
            reload_with(site, lambda t: t.replace(ALICE_TALKS, 'monitor = ["marine"]'))
            await until(lambda: stops, 1, "the console to lose the floor")
            print(f"reload → floor dropped: {(stops[0] - reloaded) * 1000:.0f} ms")
            assert stops[0] - reloaded < 0.2
            assert not marine.can_talk and not marine.ptt
            assert site.console_port("alice", "land") is None, "land seat still attached"
            tile = page.locator('[data-talkgroup="marine"]')
            await (
                tile.locator(".state")
                .filter(has_text="talk permission withdrawn")
                .wait_for(timeout=3000)
            )
            await tile.locator('.ptt[aria-disabled="true"][title="monitor only"]').wait_for(
                timeout=3000
            )
            await page.locator('[data-talkgroup="land"]').wait_for(state="detached", timeout=3000)
            # Still holding the button: the gateway refuses PTT from now on.
            quiet = time.time()
            await page.mouse.up()
            await page.mouse.down()
            for _ in range(25):  # half a second of ticks
                assert not marine.ptt and not marine.talking
                await asyncio.sleep(0.02)
            await page.mouse.up()
            assert radio.audio_since(quiet + 0.05).size == 0, "the radio still hears alice"
            assert site.console_port("alice", "marine") is marine  # she still listens

            # Now alice is removed: logged out, every seat detached, cookie worthless.
            reload_with(site, without_alice)
            await (
                page.locator("#login-error")
                .filter(has_text="Logged out by the gateway: operator removed from config")
                .wait_for(timeout=3000)
            )
            assert site.console_port("alice", "marine") is None
            assert not site.gateway.console.sessions.by_token
            me = await page.evaluate("fetch('/api/console/me').then(r => r.status)")
            assert me == 401
            records = site.audit_records()
            changes = {
                (r["talkgroup"], r["mode"])
                for r in records
                if r["event"] == "console_permission_changed"
            }
            assert changes == {("marine", "monitor"), ("land", "none")}, changes
            assert any(
                r["event"] == "console_ptt" and r.get("reason") == "talk permission withdrawn"
                for r in records
            )
            ended = [r for r in records if r["event"] == "console_session_ended"]
            assert [r["reason"] for r in ended] == ["operator removed from config"]

    run(scenario())


def without_alice(text: str) -> str:
    """The site file with alice's account deleted."""
    return (
        text[: text.index("[console.operators.alice]")]
        + text[text.index("[console.operators.bob]") :]
    )


def test_password_change_ends_sessions_and_new_rights_reach_open_pages(tmp_path):
    async def scenario():
        async with console_site(tmp_path, browser=False) as site:
            base = site.url.removesuffix("/console/")
            jar = aiohttp.CookieJar(unsafe=True)
            async with (
                aiohttp.ClientSession(cookie_jar=jar) as http,
                aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other,
            ):
                for client, name in ((http, "bob"), (other, "alice")):
                    r = await client.post(
                        f"{base}/api/console/login",
                        json={"operator": name, "password": PASSWORDS[name]},
                    )
                    assert r.status == 200
                ws = await http.ws_connect(f"{base}/api/console/events")
                await ws.send_json({"type": "hello", "console": "bobconsole0001"})

                async def next_state(ws):
                    while True:
                        msg = json.loads((await ws.receive(timeout=3)).data)
                        if msg["type"] == "state":
                            return msg

                tiles = [(t["name"], t["may_talk"]) for t in (await next_state(ws))["talkgroups"]]
                assert tiles == [("marine", False)]
                # bob is given talk on land: his open page gets the tile without reloading.
                reload_with(
                    site,
                    lambda t: t.replace(
                        'monitor = ["marine"]', 'monitor = ["marine"]\ntalk = ["land"]'
                    ),
                )

                async def sees_land():
                    state = await next_state(ws)
                    return ("land", True) in [
                        (t["name"], t["may_talk"]) for t in state["talkgroups"]
                    ]

                await until(sees_land, 3, "bob's page to be offered land")
                # bob's password changes: his session ends at once, alice's does not.
                new_hash = hash_password("bob-new-password")
                reload_with(
                    site,
                    lambda t: t.replace(
                        t.split("[console.operators.bob]\npassword_hash = ", 1)[1].split("\n", 1)[
                            0
                        ],
                        f'"{new_hash}"',
                    ),
                )
                while True:
                    msg = await ws.receive(timeout=3)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    data = json.loads(msg.data)
                    if data["type"] == "logged_out":
                        assert data["reason"] == "password changed"
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code == 4001
                assert (await http.get(f"{base}/api/console/me")).status == 401
                assert (await other.get(f"{base}/api/console/me")).status == 200
                old = await http.post(
                    f"{base}/api/console/login",
                    json={"operator": "bob", "password": PASSWORDS["bob"]},
                )
                assert old.status == 401
                new = await http.post(
                    f"{base}/api/console/login",
                    json={"operator": "bob", "password": "bob-new-password"},
                )
                assert new.status == 200
            ended = [r for r in site.audit_records() if r["event"] == "console_session_ended"]
            assert [(r["operator"], r["reason"]) for r in ended] == [("bob", "password changed")]

    run(scenario())


def test_console_patches_survive_a_reload_until_a_talkgroup_goes(tmp_path):
    """A patch made at the console outlives a SIGHUP reload that keeps both talkgroups
    (audio still crosses it); a reload that removes one drops it, audited."""
    import os
    import signal

    def group_of(talkgroup):
        return next(g for g in site.gateway.engine.layout.groups if talkgroup in g.talkgroups)

    async def sighup(edit) -> None:
        path = site.tmp / "site.toml"
        text = path.read_text()
        path.write_text(edit(text))
        applied = len(site.audit_records("reload"))
        os.kill(os.getpid(), signal.SIGHUP)  # the gateway's own handler: Gateway.reload_live
        await until(lambda: len(site.audit_records("reload")) > applied, 10, "the reload done")
        assert site.audit_records("reload")[-1].get("ok", True), site.audit_records("reload")

    async def land_heard_on_marine() -> bool:
        site.radio("cbsa_land").open_squelch(True)
        since = time.time()
        try:
            await until(lambda: len(site.radio().audio_since(since)) >= RATE, 5, "audio at marine")
            return abs(fft_peak_hz(site.radio().audio_since(since)[-RATE:], RATE) - 500) < 10
        finally:
            site.radio("cbsa_land").open_squelch(False)

    site = None

    async def scenario():
        nonlocal site
        async with console_site(tmp_path, browser=False) as site:
            base = site.url.removesuffix("/console/")
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                login = {"operator": "alice", "password": PASSWORDS["alice"]}
                r = await http.post(f"{base}/api/console/login", json=login)
                assert r.status == 200
                ws = await http.ws_connect(f"{base}/api/console/events")
                await ws.send_json({"type": "hello", "console": "0123456789abcdef"})
                await ws.send_json({"type": "patch", "talkgroups": ["marine", "land"]})
                await until(lambda: group_of("marine").patched, 5, "marine and land patched")
                assert await land_heard_on_marine()
                # A reload that keeps both talkgroups keeps the patch, and its audio.
                await sighup(lambda t: t.replace("Shiprider working channel", "Shiprider ch 2"))
                assert site.gateway.engine.talkgroups["marine"].description == "Shiprider ch 2"
                assert group_of("marine").patched and "land" in group_of("marine").talkgroups
                assert await land_heard_on_marine()
                assert not any(r["event"] == "console_patch_dropped" for r in site.audit_records())
                # Removing land drops it, with an audit record saying why.
                await sighup(lambda t: t[: t.index("[talkgroups.land]")])
                assert "land" not in site.gateway.engine.talkgroups
                assert not group_of("marine").patched
                dropped = await until(
                    lambda: [
                        r for r in site.audit_records() if r["event"] == "console_patch_dropped"
                    ],
                    5,
                    "the dropped patch audited",
                )
                assert dropped[0]["operator"] == "alice" and dropped[0]["patch"] == "console-1"
                off = [r for r in site.audit_records("patch") if r["state"] == "off"]
                assert off[-1]["by"] == "reload:SIGHUP", off
                await ws.close()

    run(scenario())
