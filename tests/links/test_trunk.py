"""The trunk between two real gateways on loopback over TLS: shared talkgroups carry audio
both ways, nothing else crosses, a cut from either side stops it, a restore brings it back.

Audio is judged by content: each talkgroup's radio speaks its own tone, and what the
radios on the other side hear is measured in that tone's band (band_db).
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
    until,
)

from tests.sip.sip_peers import run

HEARD = -40.0  # a tone at -20 dBFS arrives around -20..-26 dB through G.711
SILENT = -70.0


def two_sites(tmp: Path, ca_share: dict[str, str], us_share: dict[str, str]):
    pki = make_pki(tmp, ("ca", "us"))
    ca = SiteSpec("ca", {"marine": 1000.0, "police": 700.0}, [LinkSpec("us", "us", ca_share)])
    us = SiteSpec("us", {"harbor": 1500.0, "sheriff": 500.0}, [LinkSpec("ca", "ca", us_share)])
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    return site_toml(tmp, ca, ports, pki), site_toml(tmp, us, ports, pki)


async def both_up(ca, us, name: str) -> None:  # noqa: ANN001
    await until(
        lambda: share_state(ca, "us", name) == "up" and share_state(us, "ca", name) == "up",
        15,
        f"{name} up on both sides",
    )


def test_shared_talkgroup_carries_audio_both_ways_and_nothing_else(tmp_path: Path) -> None:
    ca_path, us_path = two_sites(tmp_path, {"marine": "shiprider"}, {"harbor": "shiprider"})

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us, "shiprider")
            assert len(link_legs(ca)) == 1 and len(link_legs(us)) == 1, "one dialog per name"
            radio(ca, "marine").speaking = True
            radio(ca, "police").speaking = True  # unshared: must never cross
            await until(lambda: radio(us, "harbor").level(1000.0, 0.5) > HEARD, 5, "CA at US")
            await asyncio.sleep(1.0)
            assert radio(us, "harbor").level(1000.0) > HEARD
            assert radio(us, "harbor").level(700.0) < SILENT, "an unshared talkgroup crossed"
            assert radio(us, "sheriff").level(1000.0) < SILENT
            assert radio(us, "sheriff").level(700.0) < SILENT
            radio(ca, "marine").speaking = radio(ca, "police").speaking = False
            radio(us, "harbor").speaking = True
            await until(lambda: radio(ca, "marine").level(1500.0, 0.5) > HEARD, 5, "US at CA")
            assert radio(ca, "police").level(1500.0) < SILENT
            # Still exactly one dialog per shared name after both sides dialled.
            assert len(link_legs(ca)) == 1 and len(link_legs(us)) == 1

    run(main())
