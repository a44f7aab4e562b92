"""A live reload of ``[links]``: a share added starts carrying at once, a share withdrawn
stops at once and the peer's redials are refused, a share left alone keeps its dialog
(no drop), and a link removed ends its dialogs. Cuts are not config and survive.

Each case edits one site's file and reloads it the way SIGHUP does (``reload_live``),
then judges by tones what crosses.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from trunk_sites import (
    LinkSpec,
    SiteSpec,
    link_legs,
    make_pki,
    radio,
    running,
    share_state,
    site_toml,
)

from tests.sip.sip_peers import run
from tests.waiting import until

HEARD = -40.0
SILENT = -70.0


def test_shares_added_and_withdrawn_by_a_reload_apply_at_once(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, ("ca", "us"))
    ca = SiteSpec(
        "ca", {"marine": 1000.0, "police": 700.0}, [LinkSpec("us", "us", {"marine": "shiprider"})]
    )
    us = SiteSpec(
        "us",
        {"harbor": 1500.0, "sheriff": 500.0},
        [LinkSpec("ca", "ca", {"harbor": "shiprider", "sheriff": "patrol"})],
    )
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    ca_path, us_path = site_toml(tmp_path, ca, ports, pki), site_toml(tmp_path, us, ports, pki)

    async def main() -> None:
        async with running(ca_path) as ca_gw, running(us_path) as us_gw:
            await until(lambda: share_state(ca_gw, "us", "shiprider") == "up", 20, "shiprider up")
            kept = ca_gw.links.trunks["us"].names["shiprider"].dialog
            radio(ca_gw, "marine").speaking = radio(ca_gw, "police").speaking = True
            await until(
                lambda: radio(us_gw, "harbor").level(1000.0, 0.5) > HEARD, 10, "marine at US"
            )
            assert radio(us_gw, "sheriff").level(700.0) < SILENT, "police crossed unshared"

            # CA now shares police as "patrol" too: it crosses, shiprider is not dropped.
            ca.links = [LinkSpec("us", "us", {"marine": "shiprider", "police": "patrol"})]
            site_toml(tmp_path, ca, ports, pki)
            result = await ca_gw.reload_live()
            assert result.ok, result.error
            await until(
                lambda: radio(us_gw, "sheriff").level(700.0, 0.5) > HEARD,
                20,
                "police at US's sheriff after the reload",
            )
            assert ca_gw.links.trunks["us"].names["shiprider"].dialog is kept, "shiprider dropped"
            assert len(link_legs(ca_gw)) == 2

            # A cut survives a reload.
            ca_gw.links.cut("us", "patrol", "test", "", "test")
            # CA withdraws shiprider: it stops at once, US's redials are refused.
            refused = ca_gw.links.trunks["us"].refused_invites
            ca.links = [LinkSpec("us", "us", {"police": "patrol"})]
            site_toml(tmp_path, ca, ports, pki)
            result = await ca_gw.reload_live()
            assert result.ok, result.error
            assert "shiprider" not in ca_gw.links.trunks["us"].names
            assert ca_gw.links.trunks["us"].is_cut("patrol"), "the cut did not survive"
            await until(
                lambda: ca_gw.links.trunks["us"].refused_invites > refused,
                20,
                "US's redial of shiprider refused",
            )
            await asyncio.sleep(0.5)
            assert radio(us_gw, "harbor").level(1000.0, 0.4) < SILENT, "marine still crosses"
            assert radio(us_gw, "sheriff").level(700.0, 0.4) < SILENT, "the cut share crosses"
            assert link_legs(ca_gw) == [] and link_legs(us_gw) == []

    run(main())


def test_a_link_removed_by_a_reload_ends_its_dialogs(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, ("ca", "us"))
    ca = SiteSpec("ca", {"marine": 1000.0}, [LinkSpec("us", "us", {"marine": "shiprider"})])
    us = SiteSpec("us", {"harbor": 1500.0}, [LinkSpec("ca", "ca", {"harbor": "shiprider"})])
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    ca_path, us_path = site_toml(tmp_path, ca, ports, pki), site_toml(tmp_path, us, ports, pki)

    async def main() -> None:
        async with running(ca_path) as ca_gw, running(us_path) as us_gw:
            await until(lambda: share_state(us_gw, "ca", "shiprider") == "up", 20, "link up")
            radio(ca_gw, "marine").speaking = True
            await until(
                lambda: radio(us_gw, "harbor").level(1000.0, 0.5) > HEARD, 10, "marine at US"
            )
            ca.links = []
            site_toml(tmp_path, ca, ports, pki)
            result = await ca_gw.reload_live()
            assert result.ok, result.error
            assert ca_gw.links.trunks == {}
            assert link_legs(ca_gw) == [], "the removed link's leg is still on the engine"
            await until(lambda: link_legs(us_gw) == [], 10, "US to see the dialog end")
            await asyncio.sleep(1.0)  # US redials meanwhile: nobody answers for that link
            assert radio(us_gw, "harbor").level(1000.0, 0.5) < SILENT
            assert link_legs(us_gw) == []

    run(main())
