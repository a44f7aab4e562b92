"""The console's web edge as an attacker meets it: raw HTTP and WebSocket on loopback
against the real gateway (cross-site WebSocket hijacking, CSRF-able content types,
framing, lock-outs that deny a whole room, nesting bombs)."""

from __future__ import annotations

import json

import aiohttp
from console_site import PASSWORDS, console_site, run

EVIL = "http://evil.example"


async def logged_in(base: str) -> aiohttp.ClientSession:
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    r = await http.post(
        f"{base}/api/console/login", json={"operator": "alice", "password": PASSWORDS["alice"]}
    )
    assert r.status == 200
    return http


def test_websocket_refuses_a_foreign_origin(tmp_path):
    async def scenario():
        async with console_site(tmp_path, browser=False) as site:
            base = site.url.removesuffix("/console/")
            http = await logged_in(base)
            try:
                try:
                    await http.ws_connect(f"{base}/api/console/events", origin=EVIL)
                    raise AssertionError("a page of another site opened the event socket")
                except aiohttp.WSServerHandshakeError as exc:
                    assert exc.status == 403
                ws = await http.ws_connect(f"{base}/api/console/events", origin=base)
                await ws.send_json({"type": "ping"})
                assert (await ws.receive_json(timeout=5))["type"] == "pong"
                await ws.close()
            finally:
                await http.close()

    run(scenario())


def test_login_takes_only_json_from_its_own_origin(tmp_path):
    async def scenario():
        async with console_site(tmp_path, browser=False) as site:
            base = site.url.removesuffix("/console/")
            body = json.dumps({"operator": "alice", "password": PASSWORDS["alice"]})
            url = f"{base}/api/console/login"
            async with aiohttp.ClientSession() as http:
                # What a form on another site can send without a CORS preflight.
                r = await http.post(
                    url, data=body, headers={"Content-Type": "text/plain", "Origin": EVIL}
                )
                assert r.status in (403, 415) and "Set-Cookie" not in r.headers
                r = await http.post(url, data=body, headers={"Content-Type": "text/plain"})
                assert r.status == 415 and "Set-Cookie" not in r.headers
                r = await http.post(
                    url, data=body, headers={"Content-Type": "application/json", "Origin": EVIL}
                )
                assert r.status == 403 and "Set-Cookie" not in r.headers
                r = await http.post(
                    url, data=body, headers={"Content-Type": "application/json", "Origin": base}
                )
                assert r.status == 200

    run(scenario())


def test_pages_forbid_framing_and_foreign_code(tmp_path):
    async def scenario():
        async with console_site(tmp_path, browser=False) as site:
            base = site.url.removesuffix("/console/")
            async with aiohttp.ClientSession() as http:
                for path in ("/console/", "/console/static/console.js", "/api/console/me"):
                    r = await http.get(base + path)
                    csp = r.headers.get("Content-Security-Policy", "")
                    assert "frame-ancestors 'none'" in csp, (path, csp)
                    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
                    assert r.headers.get("X-Frame-Options") == "DENY"
                    assert r.headers.get("X-Content-Type-Options") == "nosniff"

    run(scenario())


def test_lockout_is_per_operator_and_address_not_the_whole_room(tmp_path):
    async def scenario():
        async with console_site(tmp_path, browser=False) as site:
            base = site.url.removesuffix("/console/")
            url = f"{base}/api/console/login"
            async with aiohttp.ClientSession() as http:
                codes = []
                for _ in range(5):  # bob's colleague mistypes bob's password (3 allowed)
                    r = await http.post(url, json={"operator": "bob", "password": "typo"})
                    codes.append(r.status)
                assert codes[:2] == [401, 401] and set(codes[2:]) == {429}
                # Alice, at the same workstation address, still logs in.
                r = await http.post(url, json={"operator": "alice", "password": PASSWORDS["alice"]})
                assert r.status == 200

    run(scenario())


def test_deeply_nested_json_is_a_400_not_a_500(tmp_path):
    async def scenario():
        async with console_site(tmp_path, browser=False) as site:
            base = site.url.removesuffix("/console/")
            bomb = "[" * 200000 + "]" * 200000
            async with aiohttp.ClientSession() as http:
                for text in (bomb, '{"operator": ' + "[" * 100 + "]" * 100 + "}"):
                    r = await http.post(
                        f"{base}/api/console/login",
                        data=text,
                        headers={"Content-Type": "application/json"},
                    )
                    assert r.status == 400, r.status
            http = await logged_in(base)
            try:
                ws = await http.ws_connect(f"{base}/api/console/events")
                await ws.send_str(bomb)
                assert (await ws.receive_json(timeout=5))["type"] == "error"
                await ws.send_json({"type": "ping"})  # the socket still works
                assert (await ws.receive_json(timeout=5))["type"] == "pong"
                await ws.close()
            finally:
                await http.close()

    run(scenario())
