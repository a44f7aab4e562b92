"""One floor on both sides even where a shared name carries audio one way only.

Canada shares its talkgroup so that the US hears it but is not heard in Canada (CA
``send`` meeting US ``both``, or CA ``both`` meeting US ``receive``: the same flow).
The floor is still one floor: each side counts the other's talker, whichever way the
audio goes. A US talker holding the floor holds it in Canada too, though Canada
cannot hear it (the Canadian who keys later hears the busy tone and is heard nowhere);
a Canadian talker holding it holds it in the US (the US radio that keys later hears
the busy tone and the Canadian). Two real gateways on loopback over TLS and SRTP;
audio judged by content (CA 1000 Hz, US 1500 Hz, busy tone 480 + 620 Hz).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_link_talker import BUSY_HZ, holder
from trunk_sites import LinkSpec, SiteSpec, ear, make_pki, radio, running, share_state, site_toml

from tests.sip.sip_peers import run
from tests.waiting import until

# A tone heard is at -20 dB (the busy tone -24 over its 0.5 s on / 0.5 s off cadence); a
# loaded machine's late packets leave artefacts near -50 dB in other bands. Between.
HEARD = -30.0
SILENT = -40.0


def one_way_sites(tmp: Path, ca_direction: str, us_direction: str) -> tuple[Path, Path]:
    pki = make_pki(tmp, ("ca", "us"))
    ca_share = f'{{ as = "shiprider", direction = "{ca_direction}" }}'
    us_share = f'{{ as = "shiprider", direction = "{us_direction}" }}'
    ca = SiteSpec(
        "ca",
        {"marine": 1000.0},
        [LinkSpec("us", "us", {"marine": ca_share})],
        floor="single",
        listeners=("marine",),
    )
    us = SiteSpec(
        "us",
        {"harbor": 1500.0},
        [LinkSpec("ca", "ca", {"harbor": us_share})],
        floor="single",
        listeners=("harbor",),
    )
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    return site_toml(tmp, ca, ports, pki), site_toml(tmp, us, ports, pki)


async def agreed(ca, us, site: str) -> None:  # noqa: ANN001
    await until(lambda: holder(ca) == holder(us) == site, 10, f"both sides to say {site} holds")
    for _ in range(10):  # and they stay agreed
        await asyncio.sleep(0.05)
        assert holder(ca) == holder(us) == site


@pytest.mark.parametrize(("ca_direction", "us_direction"), [("send", "both"), ("both", "receive")])
def test_a_one_way_share_still_has_one_floor(
    tmp_path: Path, ca_direction: str, us_direction: str
) -> None:
    ca_path, us_path = one_way_sites(tmp_path, ca_direction, us_direction)

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await until(
                lambda: (
                    share_state(ca, "us", "shiprider") == "up"
                    and share_state(us, "ca", "shiprider") == "up"
                ),
                15,
                "up",
            )
            flow = ca.links.trunks["us"].names["shiprider"]
            assert flow.state == "up"
            # The US keys first. Canada does not hear it (the audio goes CA → US only),
            # but the US holds the floor there too: the Canadian who keys later is busy.
            radio(us, "harbor").speaking = True
            await until(lambda: holder(ca) == "us", 10, "Canada to count the US talker")
            radio(ca, "marine").speaking = True
            await agreed(ca, us, "us")
            await until(
                lambda: radio(ca, "marine").level(BUSY_HZ, 1.0) > HEARD,
                5,
                "the later Canadian to hear the busy tone",
            )
            await until(
                lambda: (
                    ear(ca, "marine").level(1000.0, 0.4) < SILENT
                    and ear(us, "harbor").level(1000.0, 0.4) < SILENT
                ),
                5,
                "the Canadian, who does not hold the floor, heard nowhere",
            )
            assert ear(ca, "marine").level(1500.0, 0.4) < SILENT, "US audio crossed a send share"
            assert ear(us, "harbor").level(1500.0, 0.4) > HEARD, "the US holder heard at home"
            assert radio(us, "harbor").level(BUSY_HZ, 1.0) < SILENT
            radio(ca, "marine").speaking = radio(us, "harbor").speaking = False
            await until(lambda: holder(ca) is None and holder(us) is None, 10, "floor free")
            await asyncio.sleep(1.0)  # the busy tone's cadence out of the radios' ears

            # Canada keys first: it holds on both sides; the US radio keying later is busy
            # and hears Canada.
            radio(ca, "marine").speaking = True
            await until(lambda: holder(us) == "ca", 10, "the US to count the Canadian")
            radio(us, "harbor").speaking = True
            await agreed(ca, us, "ca")
            await until(
                lambda: radio(us, "harbor").level(BUSY_HZ, 1.0) > HEARD,
                5,
                "the later US radio to hear the busy tone",
            )
            await until(
                lambda: (
                    ear(us, "harbor").level(1000.0, 0.4) > HEARD
                    and ear(us, "harbor").level(1500.0, 0.4) < SILENT
                ),
                5,
                "the Canadian heard in the US, the US radio not",
            )
            assert ear(ca, "marine").level(1000.0, 0.4) > HEARD
            assert radio(ca, "marine").level(BUSY_HZ, 1.0) < SILENT

    run(main())
