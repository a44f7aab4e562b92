"""Opus at the payload type the peer chose, and kept across a re-INVITE.

Opus has no static payload type: a peer may put ``opus/48000/2`` at any dynamic one
(96-127), and the answer must use the offer's number (RFC 3264 §6.1). A re-INVITE on a
link keeps a codec of the link's own list, not the site's ``[sip] codecs`` (which
serve phones and allow no Opus). The peer is written by hand (tests/links/
raw_link_peer.py): SIP over TLS with the CA site's certificate, SRTP with its own
keys, Opus at payload type 96. Audio is judged by content: a tone above 4 kHz
crosses only on a wideband codec, both ways.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from raw_link_peer import DECODE_RATE, RawLinkPeer
from trunk_sites import (
    RATE,
    LinkSpec,
    SiteSpec,
    _unused_port,
    band_db,
    dominant_hz,
    link_leg,
    make_pki,
    radio,
    running,
    share_state,
    site_toml,
)

from tests.sip.sip_peers import run
from tests.waiting import until

OPUS_TYPE = 96  # the peer's number for Opus (BorderLink's own is 111)
PEER_HZ = 6000.0  # the hand-written peer's tone
RADIO_HZ = 5000.0  # the US radio's: both above G.711's 4 kHz
HEARD = -30.0  # both speak at -20 dBFS


def site(tmp: Path, sip: str = "") -> tuple[Path, object]:
    """US with talkgroup harbor shared as "ship" with site CA, which the test plays.
    CA's own address is a port nobody listens on: US's dials there fail, and the
    dialog is the one the test's peer places."""
    pki = make_pki(tmp, ("ca", "us"))
    us = SiteSpec("us", {"harbor": RADIO_HZ}, [LinkSpec("ca", "ca", {"harbor": "ship"})])
    return site_toml(tmp, us, {"ca": _unused_port()}, pki, sip=sip), (pki, us)


async def dial(pki, us) -> RawLinkPeer:  # noqa: ANN001
    cert = pki.certs["ca"]
    peer = RawLinkPeer("ca", cert.certificate, cert.key, OPUS_TYPE, PEER_HZ)
    await peer.connect(us.tls_port, pki.cas["us"].bundle, "us.link.test")
    return peer


def numbers(body: str) -> list[str]:
    """The payload types of the SDP's audio m= line."""
    found = re.search(r"^m=audio \d+ \S+ ([\d ]+)", body, re.M)
    return found.group(1).split() if found else []


async def both_ways(gateway, peer: RawLinkPeer, since: float) -> None:  # noqa: ANN001
    """The peer's tone at the US radio, the radio's at the peer, as Opus at the peer's
    payload type only (all of it received since ``since``, loop time)."""
    ear = radio(gateway, "harbor")
    await until(lambda: ear.level(PEER_HZ, 0.5) > HEARD, 10, "the peer's 6 kHz at US")
    assert abs(dominant_hz(ear.recent(0.5), RATE) - PEER_HZ) < 30
    loop = asyncio.get_running_loop()
    await until(lambda: loop.time() - since > 1.5, 5, "1.5 s of the radio")
    kinds, pcm = peer.heard(since + 0.5)
    assert kinds == {OPUS_TYPE}, kinds
    assert abs(dominant_hz(pcm, DECODE_RATE) - RADIO_HZ) < 30
    assert band_db(pcm, DECODE_RATE, RADIO_HZ) > HEARD


def test_opus_at_the_peers_payload_type_crosses_both_ways(tmp_path: Path) -> None:
    us_path, (pki, us) = site(tmp_path)

    async def main() -> None:
        async with running(us_path) as gateway:
            peer = await dial(pki, us)
            try:
                status, answer = await peer.invite("ship")
                assert status == 200, answer
                assert numbers(answer) == [str(OPUS_TYPE)], "Opus, under the offer's number"
                assert f"a=rtpmap:{OPUS_TYPE} opus/48000/2" in answer
                await until(lambda: share_state(gateway, "ca", "ship") == "up", 5, "link up")
                leg = link_leg(gateway)
                assert (
                    leg.bank.table.opus[leg.row]
                    and leg.bank.table.payload_type[leg.row] == OPUS_TYPE
                )
                radio(gateway, "harbor").speaking = True
                since = asyncio.get_running_loop().time()
                peer.start_media()
                await both_ways(gateway, peer, since)
                assert leg.stats()["packets_malformed"] == 0
            finally:
                await peer.close()

    run(main())


def test_a_reinvite_on_a_link_keeps_the_links_codec(tmp_path: Path) -> None:
    # The site's phones are on A-law: its [sip] codecs name neither Opus nor µ-law.
    us_path, (pki, us) = site(tmp_path, sip='codecs = ["pcma"]\n')

    async def main() -> None:
        async with running(us_path) as gateway:
            peer = await dial(pki, us)
            try:
                status, answer = await peer.invite("ship")
                assert status == 200 and numbers(answer) == [str(OPUS_TYPE)]
                radio(gateway, "harbor").speaking = True
                peer.start_media()
                await both_ways(gateway, peer, asyncio.get_running_loop().time())
                leg = link_leg(gateway)
                # A session refresh: the same offer again, in the dialog (RFC 4028's way).
                status, again = await peer.invite("ship")
                assert status == 200, "a link's re-INVITE is answered from the link's codecs"
                assert numbers(again) == [str(OPUS_TYPE)]
                assert f"a=rtpmap:{OPUS_TYPE} opus/48000/2" in again
                assert link_leg(gateway) is leg and leg.bank.table.opus[leg.row]
                assert leg.bank.table.payload_type[leg.row] == OPUS_TYPE
                await both_ways(gateway, peer, asyncio.get_running_loop().time())
                assert share_state(gateway, "ca", "ship") == "up"
            finally:
                await peer.close()

    run(main())
