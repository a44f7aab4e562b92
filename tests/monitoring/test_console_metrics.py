"""Console logins on /metrics and in the audit log, through the real console web server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from live_site import http_get, live_site

from gateway.webrtc.passwords import hash_password
from tests.waiting import until


def test_console_sessions_are_counted_and_logins_audited(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    toml = f"""
[site]
name = "Console metrics"
country = "US"

[web]
port = 0

[audit]
path = "{audit}"

[ports.radio]
kind = "simulated_radio"
talk_offset = "1h"

[talkgroups.marine]
members = ["radio"]

[console.operators.disp1]
password_hash = "{hash_password("harbour-7")}"
talk = ["marine"]
"""

    async def scenario() -> None:
        async with live_site(tmp_path, toml) as gw:
            url = f"http://127.0.0.1:{gw.web.port}/api/console/login"

            async def sessions() -> float:
                text = (await http_get(gw, "/metrics"))[1]
                line = next(
                    x for x in text.splitlines() if x.startswith("borderlink_console_sessions")
                )
                return float(line.rsplit(" ", 1)[1])

            assert await sessions() == 0
            async with aiohttp.ClientSession() as client:
                async with client.post(url, json={"operator": "disp1", "password": "nope"}) as r:
                    assert r.status == 401
                async with client.post(
                    url, json={"operator": "disp1", "password": "harbour-7"}
                ) as r:
                    assert r.status == 200
                assert await sessions() == 1

            def logged() -> list[str]:
                return [json.loads(x)["event"] for x in audit.read_text().splitlines()]

            await until(lambda: "console_login" in logged(), 10, "the login in the audit log")
            assert "console_login_failed" in logged()
            record = next(
                json.loads(x)
                for x in audit.read_text().splitlines()
                if json.loads(x)["event"] == "console_login"
            )
            assert record["operator"] == "disp1" and record["site"] == "Console metrics"
            assert "harbour-7" not in audit.read_text()  # never the password

    asyncio.run(scenario())
