"""Interarrival jitter on a link, in the right units for G.711 and for Opus.

RFC 3550 §6.4.1 puts the jitter of a receiver report in units of the stream's RTP
clock: 8 kHz for G.711, 48 kHz for Opus (RFC 7587). Two real gateways over TLS and
SRTP, their media through the impairment relay with a known jitter: the receiving
side's own figure (seconds) follows the relay's setting, and the report it sends —
read, decrypted, by the other gateway — says the same in the codec's clock (a report
in 8 kHz units on an Opus leg is six times too small, and any peer reading it by the
RFC would see it so).
"""

from __future__ import annotations

import pytest
from relay import Impairment, UdpRelay
from trunk_sites import (
    LinkSpec,
    SiteSpec,
    both_up,
    link_leg,
    make_pki,
    media_through,
    radio,
    running,
    site_toml,
)

from tests.sip.sip_peers import run
from tests.waiting import until

JITTER = 0.015  # ± seconds, uniform, on every datagram through the relay
# RFC 3550's estimate is the mean |difference of two transits|: 2/3 of JITTER (10 ms)
# on a quiet machine. Late ticks of a busy one only add to it (50-70 ms seen beside
# stress-ng), so the relay's setting gives a floor, not a ceiling: a figure six times
# too small falls under it, and one six times too large (or small) is told by
# comparing the report with the receiver's own figure, which load moves alike.
LOW = 0.003
CLOCKS = {"pcmu": 8000, "opus": 48000}


@pytest.mark.parametrize("codec", ["pcmu", "opus"])
def test_jitter_is_reported_in_the_codecs_clock(tmp_path, codec: str) -> None:  # noqa: ANN001
    pki = make_pki(tmp_path, ("ca", "us"))
    ca = SiteSpec("ca", {"marine": 1000.0}, [LinkSpec("us", "us", {"marine": "ship"})])
    us = SiteSpec("us", {"harbor": 1500.0}, [LinkSpec("ca", "ca", {"harbor": "ship"})])
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    ca_path, us_path = site_toml(tmp_path, ca, ports, pki), site_toml(tmp_path, us, ports, pki)
    if codec == "pcmu":  # (by default BorderLinks agree Opus)
        name = 'peer_name = "us.link.test"\n'
        ca_path.write_text(ca_path.read_text().replace(name, f'{name}codecs = ["pcmu"]\n'))

    async def main() -> None:
        async with (
            UdpRelay(("127.0.0.1", 9), seed=3) as relay,
            running(ca_path) as ca_gw,
            running(us_path) as us_gw,
        ):
            await both_up(ca_gw, us_gw, "ship")
            sender, receiver = link_leg(ca_gw), link_leg(us_gw)
            assert sender.bank.table.opus[sender.row] == (codec == "opus")
            await media_through(sender, receiver, relay)
            radio(ca_gw, "marine").speaking = True
            relay.impair = Impairment(jitter=JITTER)  # both ways
            media = sender.bank.table.media[sender.row]
            # The estimate settles within a second (gain 1/16 a packet); then a report of
            # US's, made after that, must reach CA (one every 5 s per leg).
            await until(lambda: relay.up.forwarded > 2000 // 20 + 50, 15, "2 s of jitter")
            reports = media.rtcp.reports_in
            await until(lambda: media.rtcp.reports_in > reports, 15, "a report after that")
            here = receiver.stats()["jitter_seconds"]  # US's own figure, now
            reported = media.rtcp.remote_jitter  # what US's report said, in RTP units
            assert here > LOW, here
            assert reported / CLOCKS[codec] > LOW, (reported, here)
            assert 0.4 < reported / CLOCKS[codec] / here < 2.5, (reported, here)
            assert 0.4 < sender.stats()["remote_jitter_seconds"] / here < 2.5

    run(main())
