"""Opus between BorderLinks: agreed in SDP, wideband, in-band FEC on a lossy link, and a
garbage payload from the peer counted, never fatal. (A BSI-Core peer still gets G.711:
tests/links/test_bsi_core.py.)

Two real gateways on loopback over TLS with SRTP; audio judged by content: a 6 kHz tone
cannot cross G.711 (8 kHz sampling: nothing above 4 kHz), so it proves the codec.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from relay import Impairment, UdpRelay
from trunk_sites import (
    RATE,
    LinkSpec,
    SiteSpec,
    band_db,
    both_up,
    dominant_hz,
    link_leg,
    make_pki,
    media_through,
    radio,
    running,
    site_toml,
)

from gateway.sip.srtp import TAG
from tests.sip.sip_peers import run
from tests.waiting import until

OPUS, PCMU = 111, 0  # payload types: ours for opus/48000/2, and G.711 µ-law's
WIDE_HZ = 6000.0  # above G.711's 4 kHz: only a wideband codec carries it
TONE_HZ = 1033.0  # not a multiple of 50 Hz: a concealed frame breaks its phase
HEARD = -30.0  # the radios speak at -20 dBFS


def sites(tmp: Path, tone: float, ca_codecs: str = "") -> tuple[Path, Path]:
    pki = make_pki(tmp, ("ca", "us"))
    ca = SiteSpec("ca", {"marine": tone}, [LinkSpec("us", "us", {"marine": "ship"})])
    us = SiteSpec("us", {"harbor": 1500.0}, [LinkSpec("ca", "ca", {"harbor": "ship"})])
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    ca_path, us_path = site_toml(tmp, ca, ports, pki), site_toml(tmp, us, ports, pki)
    if ca_codecs:
        name = 'peer_name = "us.link.test"\n'
        ca_path.write_text(ca_path.read_text().replace(name, f"{name}codecs = {ca_codecs}\n"))
    return ca_path, us_path


def codec(gateway) -> int:  # noqa: ANN001
    leg = link_leg(gateway)
    return int(leg.bank.table.payload_type[leg.row])


def test_borderlinks_agree_opus_and_a_wideband_tone_crosses(tmp_path: Path) -> None:
    ca_path, us_path = sites(tmp_path, WIDE_HZ)

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us, "ship")
            assert codec(ca) == OPUS and codec(us) == OPUS, "BorderLinks prefer Opus"
            dialog = next(iter(us.sip.calls.dialogs.values()))
            assert "opus/48000/2" in dialog.body and "useinbandfec=1" in dialog.body
            radio(ca, "marine").speaking = True
            ear = radio(us, "harbor")
            await until(lambda: ear.level(WIDE_HZ, 0.5) > HEARD, 10, "6 kHz at US")
            await asyncio.sleep(1.0)
            heard = ear.recent(1.0)
            assert abs(dominant_hz(heard, RATE) - WIDE_HZ) < 30
            assert -26.0 < band_db(heard, RATE, WIDE_HZ) < -14.0, "about the level spoken"
            assert link_leg(us).stats()["packets_malformed"] == 0

    run(main())


def test_a_link_set_to_g711_carries_no_wideband(tmp_path: Path) -> None:
    # The same pair with CA offering only µ-law: both agree PCMU, and 6 kHz cannot cross.
    ca_path, us_path = sites(tmp_path, WIDE_HZ, ca_codecs='["pcmu"]')

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us, "ship")
            assert codec(ca) == PCMU and codec(us) == PCMU
            radio(ca, "marine").speaking = True
            await until(lambda: link_leg(us).stats()["packets_in"] > 100, 10, "CA's audio")
            await asyncio.sleep(1.0)
            assert radio(us, "harbor").level(WIDE_HZ) < -50.0

    run(main())


def test_fec_recovers_most_losses_on_a_lossy_link(tmp_path: Path) -> None:
    ca_path, us_path = sites(tmp_path, TONE_HZ)

    async def main() -> None:
        async with (
            UdpRelay(("127.0.0.1", 9), seed=15) as relay,
            running(ca_path) as ca,
            running(us_path) as us,
        ):
            await both_up(ca, us, "ship")
            await media_through(link_leg(ca), link_leg(us), relay)
            assert codec(us) == OPUS
            mouth, ear = radio(ca, "marine"), radio(us, "harbor")
            mouth.speaking = True
            await until(lambda: ear.level(TONE_HZ, 0.5) > HEARD, 10, "the tone at US")
            leg = link_leg(us)
            before = leg.stats()
            lost_before = relay.up.lost
            relay.impair = Impairment(loss=0.08)  # CA → US: 8 % of packets, at random
            await until(lambda: relay.up.lost - lost_before >= 25, 30, "25 packets lost")
            relay.impair = Impairment()
            await asyncio.sleep(0.5)  # the last losses played out
            after = leg.stats()
            lost = relay.up.lost - lost_before
            recovered = after["fec_recovered"] - before["fec_recovered"]
            concealed = after["concealed_samples"] - before["concealed_samples"]
            frame = round(0.02 * RATE)
            # A loss whose successor came is decoded from its FEC, not made up: most of
            # them (two in a row leave the first to concealment, and so may a busy machine's
            # late ticks, which also stretch the buffer: bounds with room for both).
            assert recovered >= lost // 3, (lost, recovered, concealed)
            assert concealed < lost * frame, (lost, recovered, concealed)
            await until(lambda: ear.level(TONE_HZ, 0.5) > HEARD, 10, "the tone after")
            assert abs(dominant_hz(ear.recent(0.5), RATE) - TONE_HZ) < 20

    run(main())


def test_a_garbage_opus_payload_is_counted_not_fatal(tmp_path: Path) -> None:
    ca_path, us_path = sites(tmp_path, TONE_HZ)
    garbage = (
        bytes([0xFF, 0xFF]) + bytes(30),  # TOC: 63 frames of 20 ms: not a packet
        bytes([0x42, 0xFA, 1, 2, 3]),  # two 10 ms frames, the first 250 bytes long: it is 1
        b"",  # no payload at all (dropped as "layout" before the codec sees it)
    )

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us, "ship")
            mouth, ear = radio(ca, "marine"), radio(us, "harbor")
            mouth.speaking = True
            await until(lambda: ear.level(TONE_HZ, 0.5) > HEARD, 10, "the tone at US")
            # CA's own leg sends them, authenticated with its SRTP key: only the payload lies.
            sender = link_leg(ca)
            bank, row = sender.bank, sender.row
            media = bank.table.media[row]
            for payload in garbage:
                header = bytes([0x80, int(bank.table.payload_type[row])]) + int(
                    bank.table.tx_seq[row]
                ).to_bytes(2, "big")
                header += int(bank.table.tx_ts[row]).to_bytes(4, "big")
                header += int(bank.table.tx_ssrc[row]).to_bytes(4, "big")
                packet = media.srtp.protect(header + payload)
                assert packet is not None and len(packet) == 12 + len(payload) + TAG
                bank.sock.sendto(packet, media.remote)
                bank.table.tx_seq[row] = (bank.table.tx_seq[row] + 1) & 0xFFFF
                bank.table.tx_ts[row] = (bank.table.tx_ts[row] + 960) & 0xFFFFFFFF
            receiver = link_leg(us)
            await until(
                lambda: receiver.stats()["packets_malformed"] >= len(garbage),
                10,
                "each garbage payload counted",
            )
            assert us.sip.bank.table.malformed["opus"] >= 2
            await asyncio.sleep(1.0)
            assert link_leg(us) is receiver, "the dialog goes on"
            heard = ear.recent(0.5)
            assert abs(dominant_hz(heard, RATE) - TONE_HZ) < 20, "and so does the audio"
            assert np.isfinite(heard).all()

    run(main())
