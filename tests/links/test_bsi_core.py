"""A BSI-Core-only peer joins a shared talkgroup: baresip over SIP/TCP, G.711 µ-law, no
header extensions, dials the shared name on one BorderLink and hears (and is heard by) a
radio on the other side of the link.

It is not a link (no TLS identity of a BorderLink): it is a SIP caller like any other, let
in by a ``[sip.routes]`` entry whose number is the shared name — here with digest auth
(DESIGN "Trust at the edges": an identity proven by the caller, never a header). Audio is
judged by content: the phone's 600 Hz reaches CA's radio through US and the link, CA's
1000 Hz reaches the phone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from trunk_sites import LinkSpec, SiteSpec, link_legs, make_pki, radio, running, site_toml

from tests.conftest import free_port
from tests.sip.sip_peers import Phone, band_db, dominant_hz, run, tone
from tests.waiting import until

HEARD = -40.0
PHONE_RATE = 8000
PASSWORD = "bridge-secret-1"


def _ha1(user: str, password: str) -> str:
    return hashlib.md5(f"{user}:borderlink:{password}".encode()).hexdigest()  # noqa: S324


def test_a_bsi_core_peer_dials_the_shared_name_and_hears_and_is_heard_across(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path, ("ca", "us"))
    ca = SiteSpec("ca", {"marine": 1000.0}, [LinkSpec("us", "us", {"marine": "shiprider"})])
    us = SiteSpec("us", {"harbor": 1500.0}, [LinkSpec("ca", "ca", {"harbor": "shiprider"})])
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    route = f"""
[sip.routes.shiprider]
talkgroup = "harbor"
auth = "digest"
users = {{ bridge = "{_ha1("bridge", PASSWORD)}" }}
allow = ["bridge"]
"""
    ca_path = site_toml(tmp_path, ca, ports, pki)
    us_path = site_toml(
        tmp_path, us, ports, pki, extra=route, sip=f'listen_tcp = "127.0.0.1:{free_port()}"'
    )
    source = np.concatenate([np.zeros(PHONE_RATE), tone(600, 11)])
    phone = Phone(tmp_path, "bridge", source, "PCMU", password=PASSWORD, transport="tcp")

    async def main() -> None:
        async with running(ca_path) as ca_gw, running(us_path) as us_gw:
            await until(
                lambda: len(link_legs(ca_gw)) == 1 and len(link_legs(us_gw)) == 1,
                20,
                "the link up",
            )
            radio(ca_gw, "marine").speaking = True
            tcp = us_gw.sip.transport.port_for("tcp")
            phone.start(dial=f"sip:shiprider@127.0.0.1:{tcp};transport=tcp", seconds=10)
            calls = us_gw.sip.calls
            await until(
                lambda: any(p.kind == "sip" for p in us_gw.engine.ports),
                15,
                "the phone's call answered",
            )
            assert calls.rejected.get(401, 0) >= 1, "the phone was let in without a challenge"
            dialog = next(d for d in calls.dialogs.values() if d.peer.transport == "tcp")
            assert dialog.peer.identity == "", "no TLS identity: digest let it in"
            await until(
                lambda: radio(ca_gw, "marine").level(600.0, 0.5) > HEARD,
                15,
                "the phone heard on CA's radio across the link",
            )
            assert radio(us_gw, "harbor").level(600.0, 0.5) > HEARD
            # Still one link dialog each side: the phone is a caller, not a second link.
            assert len(link_legs(ca_gw)) == 1 and len(link_legs(us_gw)) == 1
            await until(lambda: not phone.running(), 20, "the phone to hang up")

    try:
        run(main())
    finally:
        phone.stop()
    heard = phone.heard()[PHONE_RATE * 2 : -PHONE_RATE // 2]
    assert abs(dominant_hz(heard, PHONE_RATE) - 1000) < 15, "the phone does not hear CA"
    assert band_db(heard, PHONE_RATE, 1000) > -30
