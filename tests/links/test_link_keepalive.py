"""One keepalive for all the dialogs of a link: many shared names cost the peer about
two OPTIONS a second, not two per name, and a link gone dark still drops every one of
its dialogs (by the keepalive) and comes back by itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay import TcpRelay
from trunk_sites import (
    LinkSpec,
    SiteSpec,
    link_legs,
    make_pki,
    running,
    share_state,
    site_toml,
)

from gateway.links.trunk import KEEPALIVE
from tests.sip.sip_peers import run
from tests.waiting import until

NAMES = ("a", "b", "c", "d", "e", "f")
WINDOW = 3.0  # seconds of counting


def test_a_link_of_six_names_sends_one_keepalive_a_round_and_drops_all_when_dark(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path, ("ca", "us"))
    ca = SiteSpec(
        "ca",
        {f"ca{n}": 1000.0 for n in NAMES},
        [LinkSpec("us", "us", {f"ca{n}": n for n in NAMES})],
    )
    us = SiteSpec(
        "us",
        {f"us{n}": 1500.0 for n in NAMES},
        [LinkSpec("ca", "ca", {f"us{n}": n for n in NAMES})],
    )

    async def main() -> None:
        async with (
            TcpRelay(("127.0.0.1", us.tls_port)) as to_us,
            TcpRelay(("127.0.0.1", ca.tls_port)) as to_ca,
        ):
            ca_path = site_toml(tmp_path, ca, {"us": to_us.port}, pki)
            us_path = site_toml(tmp_path, us, {"ca": to_ca.port}, pki)
            async with running(ca_path) as ca_gw, running(us_path) as us_gw:

                def up() -> bool:
                    return all(
                        share_state(ca_gw, "us", n) == "up" and share_state(us_gw, "ca", n) == "up"
                        for n in NAMES
                    )

                await until(up, 30, "six names up")
                options = [0]
                calls = us_gw.sip.calls
                on_request = calls.on_request

                def counting(message, *rest) -> None:  # noqa: ANN001, ANN002
                    options[0] += message.method == "OPTIONS"
                    on_request(message, *rest)

                calls.on_request = counting  # what US receives, counted; answered as ever
                loop = asyncio.get_running_loop()
                started = loop.time()
                await asyncio.sleep(WINDOW)
                elapsed = loop.time() - started
                calls.on_request = on_request
                # One round per KEEPALIVE for the link (each side runs its own): a busy
                # machine only stretches the rounds. Per dialog it was six times as many.
                rounds = elapsed / KEEPALIVE + 1
                assert 1 <= options[0] <= 2 * rounds, (options[0], elapsed)

                to_us.blackout()
                to_ca.blackout()
                await until(
                    lambda: not link_legs(ca_gw) and not link_legs(us_gw), 20, "every leg gone"
                )
                timeouts = (
                    ca_gw.links.trunks["us"].keepalive_timeouts,
                    us_gw.links.trunks["ca"].keepalive_timeouts,
                )
                assert max(timeouts) >= len(NAMES), f"not all dropped by the keepalive: {timeouts}"
                to_us.resume()
                to_ca.resume()
                await until(up, 60, "the link to come back by itself")

    run(main())
