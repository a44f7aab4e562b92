"""SIP registration state on /metrics, with the SIP suite's real kamailio registrar."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from live_site import http_get, live_site

from tests.waiting import until

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "sip"), str(ROOT)]  # as under `python -m pytest`

from sip_peers import PASSWORD, Kamailio  # noqa: E402  (the SIP suite's registrar fixture)

from tests.conftest import free_port  # noqa: E402


def test_registration_state_and_failures_per_account(tmp_path: Path) -> None:
    registrar = Kamailio(tmp_path)
    registrar.start()
    try:
        toml = f"""
[site]
name = "SIP metrics"
country = "CA"

[web]
port = 0

[ports.radio]
kind = "simulated_radio"
talk_offset = "1h"

[talkgroups.marine]
members = ["radio"]

[sip]
listen = "127.0.0.1:{free_port()}"

[sip.accounts.marine]
registrar = "127.0.0.1:{registrar.port}"
username = "6001"
password = "{PASSWORD}"

[sip.accounts.wrong]
registrar = "127.0.0.1:{registrar.port}"
username = "6002"
password = "not-the-password"
"""

        async def scenario() -> None:
            async with live_site(tmp_path, toml) as gw:

                async def scraped(line: str) -> bool:
                    return line in (await http_get(gw, "/metrics"))[1].splitlines()

                await until(
                    lambda: scraped('borderlink_sip_registered{account="marine"} 1.0'),
                    10,
                    "the marine account to show registered",
                )
                await until(
                    lambda: scraped('borderlink_sip_registered{account="wrong"} 0.0'),
                    10,
                    "the wrong-password account to show unregistered",
                )
                text = (await http_get(gw, "/metrics"))[1]
                failures = [
                    float(x.rsplit(" ", 1)[1])
                    for x in text.splitlines()
                    if x.startswith('borderlink_sip_registration_failures_total{account="wrong"}')
                ]
                assert failures and failures[0] >= 1
                assert 'borderlink_sip_registration_failures_total{account="marine"} 0.0' in text

        asyncio.run(scenario())
    finally:
        registrar.stop()
