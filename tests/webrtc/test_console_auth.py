"""Operator login over HTTP against the real gateway web server: 401s, cookies, throttling."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from console_site import PASSWORDS, console_site, run, site_toml

from gateway.config import ConfigError, parse_config
from gateway.webrtc.passwords import hash_password, verify_password
from tests.waiting import until

OFFER = {"console": "0123456789abcdef", "talkgroup": "marine", "type": "offer", "sdp": "v=0"}


async def login(http: aiohttp.ClientSession, base: str, operator: str, password: str):
    return await http.post(
        f"{base}/api/console/login", json={"operator": operator, "password": password}
    )


# The installed console script, as operators run it.
BORDERLINK = str(Path(sys.executable).parent / "borderlink")


def test_every_console_api_needs_a_session(tmp_path):
    async def scenario():
        async with console_site(tmp_path, browser=False) as site:
            base = site.url.removesuffix("/console/")
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                page = await http.get(f"{base}/console/")
                assert page.status == 200 and "PTT" in await page.text()  # the page is public
                for method, path in [
                    ("GET", "/api/console/me"),
                    ("GET", "/api/console/state"),
                    ("POST", "/api/console/join"),
                    ("POST", "/api/console/leave"),
                    ("GET", "/api/console/events"),
                ]:
                    r = await http.request(method, base + path, json=OFFER)
                    assert r.status == 401, (path, r.status)
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(f"{base}/api/console/events")
                assert refused.value.status == 401

    run(scenario())


def test_login_sets_a_safe_cookie_and_wrong_password_is_refused(tmp_path):
    async def scenario():
        async with console_site(tmp_path, browser=False) as site:
            base = site.url.removesuffix("/console/")
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                bad = await http.post(
                    f"{base}/api/console/login", json={"operator": "alice", "password": "wrong"}
                )
                assert bad.status == 401
                assert "wrong operator name or password" in (await bad.json())["error"]
                assert "borderlink_session" not in bad.cookies
                unknown = await login(http, base, "mallory", "x")
                assert unknown.status == 401
                good = await http.post(
                    f"{base}/api/console/login",
                    json={"operator": "alice", "password": PASSWORDS["alice"]},
                )
                assert good.status == 200
                cookie = good.headers["Set-Cookie"]
                assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
                me = await (await http.get(f"{base}/api/console/me")).json()
                assert me["operator"] == "alice" and me["agency"] == "USCG"
                state = await (await http.get(f"{base}/api/console/state")).json()
                assert {t["name"] for t in state["talkgroups"]} == {"marine", "land"}
                metrics = await (await http.get(f"{base}/metrics")).text()
                counts = {
                    line.split()[0]: float(line.split()[1])
                    for line in metrics.splitlines()
                    if "console_log" in line and not line.startswith("#")
                }
                assert counts == {
                    "borderlink_console_logins_total": 1.0,
                    "borderlink_console_login_failures_total": 2.0,
                    "borderlink_console_login_busy_total": 0.0,
                }, counts
                out = await http.post(f"{base}/api/console/logout", json={})
                assert out.status == 200
                assert (await http.get(f"{base}/api/console/me")).status == 401

    run(scenario())


def test_monitor_only_operator_sees_only_permitted_talkgroups(tmp_path):
    async def scenario():
        async with console_site(tmp_path, browser=False) as site:
            base = site.url.removesuffix("/console/")
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                await http.post(
                    f"{base}/api/console/login",
                    json={"operator": "bob", "password": PASSWORDS["bob"]},
                )
                state = await (await http.get(f"{base}/api/console/state")).json()
                tiles = [(t["name"], t["may_talk"]) for t in state["talkgroups"]]
                assert tiles == [("marine", False)]
                r = await http.post(f"{base}/api/console/join", json={**OFFER, "talkgroup": "land"})
                assert r.status == 403

    run(scenario())


def test_failed_logins_are_rate_limited_and_audited(tmp_path):
    async def scenario():
        async with console_site(tmp_path, browser=False) as site:
            base = site.url.removesuffix("/console/")
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                codes = []
                for _ in range(4):  # the site allows 3 failures
                    r = await login(http, base, "alice", "guess")
                    codes.append(r.status)
                assert codes == [401, 401, 429, 429]
                assert int(r.headers["Retry-After"]) > 0
                # Even the right password waits out the lock-out.
                r = await login(http, base, "alice", PASSWORDS["alice"])
                assert r.status == 429
                # Another operator at the same address is not locked out (a colleague's
                # typos do not lock the whole dispatch room out).
                r = await login(http, base, "<script>", "x")  # not echoed into the audit log
                assert r.status == 401
                r = await login(http, base, "bob", PASSWORDS["bob"])
                assert r.status == 200
                # Every try during the lock-out is audited: the first at once, the
                # others counted into the next record.
                await until(lambda: locked_tries(site) == 2, 15, "both locked tries audited")
                return site

    def locked_tries(site) -> int:
        records = site.audit_records()
        return sum(r.get("tries", 0) for r in records if r["event"] == "console_login_locked")

    site = run(scenario())
    records = site.audit_records()
    failed = [r for r in records if r["event"] == "console_login_failed"]
    assert [r["operator"] for r in failed] == ["alice", "alice", "alice", "(unknown)"]
    assert failed[2]["locked_out"] is True and failed[0]["address"] == "127.0.0.1"
    assert not any("<script>" in json.dumps(r) for r in records)


def test_passwd_prints_a_hash_that_verifies():
    out = subprocess.run(
        [BORDERLINK, "passwd", "--stdin"],
        input="correct horse battery\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out.startswith('password_hash = "scrypt$')
    stored = out.split('"')[1]
    assert verify_password("correct horse battery", stored)
    assert not verify_password("correct horse batterY", stored)
    short = subprocess.run(
        [BORDERLINK, "passwd", "--stdin"], input="short\n", capture_output=True, text=True
    )
    assert short.returncode == 2 and "at least 8" in short.stderr


def test_plain_password_in_config_is_refused_with_the_fix():
    text = site_toml().replace(
        hash_password(PASSWORDS["alice"])[:0] + 'password_hash = "scrypt',
        'password_hash = "hunter2" # "scrypt',
        1,
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, "site.toml")
    message = str(err.value)
    assert "console.operators.alice.password_hash" in message
    assert "borderlink passwd" in message


SLOW_N = 2**16  # ≈ 0.4 s per hash on an idle machine: on the loop, ≈ 20 ticks lost each


def test_a_login_flood_never_stalls_the_media_clock(tmp_path):
    """40 wrong-password logins at once while a radio talks. scrypt runs in two worker
    threads, so the event loop (and with it the media clock) never waits for a hash (on
    the loop, each hash stalled the clock for its whole length); logins beyond the
    threads and their queue get 503 at once, and the hash threads stay two."""
    import re
    import threading
    import time

    slow = hash_password("dave-secret-44", n=SLOW_N)
    dave = f'[console.operators.dave]\npassword_hash = "{slow}"\nmonitor = ["marine"]\n'

    async def scenario():
        async with console_site(tmp_path, browser=False, console=dave) as site:
            base = site.url.removesuffix("/console/")
            site.radio().open_squelch(True)  # the media clock has work on every tick
            clock = site.gateway.clock
            await until(lambda: clock.ticks > 50, 10, "the clock running")
            # One hash's length on this machine, under its load now (in a thread, as the
            # gateway runs them), to bound what the flood may cost the clock.
            started = time.monotonic()
            await asyncio.to_thread(verify_password, "wrong", slow)
            hash_s = time.monotonic() - started
            before = (clock.late_ticks, clock.skipped_ticks)
            gaps = [0.0]  # the longest the event loop was away, seen from a 5 ms timer

            async def probe() -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.005)
                    now = time.monotonic()
                    gaps[0] = max(gaps[0], now - last)
                    last = now

            watching = asyncio.ensure_future(probe())
            async with aiohttp.ClientSession() as http:

                async def attempt(k: int) -> int:
                    r = await login(http, base, "dave", f"guess-{k}")
                    if r.status == 503:
                        assert r.headers["Retry-After"] == "1"
                    return r.status

                statuses = await asyncio.gather(*(attempt(k) for k in range(40)))
                metrics = await (await http.get(f"{base}/metrics")).text()
            watching.cancel()
            late = clock.late_ticks - before[0]
            skipped = clock.skipped_ticks - before[1]
            hashed = statuses.count(401)  # each 401 cost one hash; 429 and 503 none
            counts = {s: statuses.count(s) for s in sorted(set(statuses))}
            print(
                f"hash {hash_s * 1000:.0f} ms; answers {counts}; longest loop gap "
                f"{gaps[0] * 1000:.0f} ms; clock: {late} late, {skipped} skipped"
            )
            # Hashed on the loop, each hash holds the loop (and the clock) for ≈ hash_s.
            # Off the loop nothing does; a busy machine still delays it now and then, far
            # less. (How many ticks run late depends on the machine's load as much as on
            # the flood: bench/login_flood.py prints them, on and off the loop.)
            assert gaps[0] < hash_s / 2, (gaps[0], hash_s)
            assert set(statuses) <= {401, 429, 503}, counts
            assert 503 in statuses and hashed >= 2, counts
            names = [t.name for t in threading.enumerate() if "scrypt" in t.name]
            assert len(names) <= 2, names
            assert site.gateway.console.sessions.hasher.in_flight <= 8
            busy = re.search(r"^borderlink_console_login_busy_total (\S+)$", metrics, re.M)
            assert busy and float(busy.group(1)) == counts[503], busy

    run(scenario())
