"""A registrar that restarts forgets the gateway's extension; with default settings the
gateway is registered again, and reachable through it, within 10 s of it answering again."""

from __future__ import annotations

import asyncio
import time

from sip_peers import run, running_gateway, tone
from test_calls import legs, site

from tests.waiting import until

OUTAGE_LONG = 10.0  # the outage the issue found unnoticed (keepalive 30 s then)
OUTAGE_SHORT = 1.0  # a quick restart: shorter than any ping interval worth having


def default_account_site(tmp_path, registrar_port: int) -> str:
    """The test site with the account's timers left at their defaults."""
    toml = site(tmp_path, registrar_port)
    tuned = 'expires = "60s"\nkeepalive = "1s"\n'
    assert tuned in toml
    return toml.replace(tuned, "")


def restart_registrar(kamailio, phones, tmp_path, outage: float) -> None:
    async def scenario() -> None:
        async with running_gateway(default_account_site(tmp_path, kamailio.port)) as gw:
            account = gw.sip.registrations["marine"]
            await asyncio.wait_for(account.registered.wait(), 5)
            await asyncio.to_thread(kamailio.stop)
            await asyncio.sleep(outage)  # the outage itself, not a wait for anything
            await asyncio.to_thread(kamailio.start)  # same port, empty location table
            back = time.monotonic()
            before = account.registrations
            await until(
                lambda: account.registrations > before and account.registered.is_set(),
                10,
                "a REGISTER accepted by the restarted registrar",
            )
            took = time.monotonic() - back
            print(f"registrar down {outage:.0f}s: registered again {took:.1f}s after it was back")
            # The restarted registrar knows us again: a call through it reaches the talkgroup.
            phone = phones(f"after{outage:.0f}", tone(600, 8), registrar_port=kamailio.port)
            phone.start(dial=f"sip:6001@127.0.0.1:{kamailio.port}", seconds=3)
            await until(lambda: legs(gw), 5, "a call through the restarted registrar")

    run(scenario())


def test_registrar_down_10s_default_settings_registered_again_within_10s(
    kamailio, phones, tmp_path
):
    restart_registrar(kamailio, phones, tmp_path, OUTAGE_LONG)


def test_registrar_quick_restart_default_settings_registered_again_within_10s(
    kamailio, phones, tmp_path
):
    restart_registrar(kamailio, phones, tmp_path, OUTAGE_SHORT)
