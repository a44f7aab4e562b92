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
import pytest
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
    with_frame,
)

from gateway.sip.srtp import TAG
from tests.sip.sip_peers import run
from tests.waiting import until

OPUS, PCMU = 111, 0  # payload types: ours for opus/48000/2, and G.711 µ-law's
WIDE_HZ = 6000.0  # above G.711's 4 kHz: only a wideband codec carries it
TONE_HZ = 1033.0  # not a multiple of 50 Hz: a concealed frame breaks its phase
HEARD = -30.0  # the radios speak at -20 dBFS
HOLD = 0.080  # seconds a held packet comes late (the FEC test)


class Warble:
    """-20 dBFS around ``hz``, its pitch gliding ±200 Hz four times a second, as a voice's
    does. SILK sends FEC only for frames its voice detector finds active: a steady tone
    soon counts as background (no FEC after about a second), this never does."""

    def __init__(self, hz: float) -> None:
        self.hz, self.t = hz, 0

    def read(self, n: int) -> np.ndarray:
        t = (self.t + np.arange(n)) / RATE
        self.t += n
        phase = 2 * np.pi * self.hz * t + 200 / 4 * np.sin(2 * np.pi * 4 * t)
        return (0.1 * np.sin(phase)).astype(np.float32)


def sites(
    tmp: Path, tone: float, ca_codecs: str = "", frames: tuple[str, str] = ("", "")
) -> tuple[Path, Path]:
    """CA's and US's site files; ``frames``: each engine's frame ("10ms"; "": the default)."""
    pki = make_pki(tmp, ("ca", "us"))
    ca = SiteSpec("ca", {"marine": tone}, [LinkSpec("us", "us", {"marine": "ship"})])
    us = SiteSpec("us", {"harbor": 1500.0}, [LinkSpec("ca", "ca", {"harbor": "ship"})])
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    ca_path, us_path = site_toml(tmp, ca, ports, pki), site_toml(tmp, us, ports, pki)
    if ca_codecs:
        name = 'peer_name = "us.link.test"\n'
        ca_path.write_text(ca_path.read_text().replace(name, f"{name}codecs = {ca_codecs}\n"))
    for path, frame in zip((ca_path, us_path), frames, strict=True):
        path.write_text(with_frame(path.read_text(), frame))
    return ca_path, us_path


def codec(gateway) -> int:  # noqa: ANN001
    leg = link_leg(gateway)
    return int(leg.bank.table.payload_type[leg.row])


@pytest.mark.parametrize("frame", ["20ms", "10ms"])
def test_borderlinks_agree_opus_and_a_wideband_tone_crosses(tmp_path: Path, frame: str) -> None:
    # At 10 ms frames too (10 ms packets, one a tick): the link's delay is halved there.
    ca_path, us_path = sites(tmp_path, WIDE_HZ, frames=(frame, frame))

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us, "ship")
            assert codec(ca) == OPUS and codec(us) == OPUS, "BorderLinks prefer Opus"
            dialog = next(iter(us.sip.calls.dialogs.values()))
            assert "opus/48000/2" in dialog.body and "useinbandfec=1" in dialog.body
            assert f"a=ptime:{frame[:2]}" in dialog.body
            radio(ca, "marine").speaking = True
            ear = radio(us, "harbor")
            await until(lambda: ear.level(WIDE_HZ, 0.5) > HEARD, 10, "6 kHz at US")
            await asyncio.sleep(1.0)
            heard = ear.recent(1.0)
            assert abs(dominant_hz(heard, RATE) - WIDE_HZ) < 30
            assert -26.0 < band_db(heard, RATE, WIDE_HZ) < -14.0, "about the level spoken"
            assert link_leg(us).stats()["packets_malformed"] == 0

    run(main())


def test_a_10ms_and_a_20ms_gateway_agree_g711_and_the_tone_crosses(tmp_path: Path) -> None:
    # Each side sends one packet a tick and plays one a tick: Opus needs the same packet
    # time on both sides; with different frames the link falls back to G.711 and works.
    ca_path, us_path = sites(tmp_path, TONE_HZ, frames=("10ms", "20ms"))

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us, "ship")
            assert codec(ca) == PCMU and codec(us) == PCMU
            radio(ca, "marine").speaking = True
            ear = radio(us, "harbor")
            await until(lambda: ear.level(TONE_HZ, 0.5) > HEARD, 10, "the tone at US")
            assert abs(dominant_hz(ear.recent(0.5), RATE) - TONE_HZ) < 30
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


def test_a_lost_packet_is_rebuilt_from_fec_when_the_next_one_is_in_hand(tmp_path: Path) -> None:
    # No packet is held back for FEC: a loss is rebuilt from the next packet's FEC when
    # the jitter buffer already holds that packet. Here a fifth of CA's packets reach US
    # HOLD late, so US's buffer settles behind them and every other packet waits there
    # longer than a packet time: the packet after a lost one is in hand unless it was lost
    # or held itself. The relay's trace says which losses had their successor in time.
    ca_path, us_path = sites(tmp_path, TONE_HZ)
    wan = Impairment(reorder=0.2, reorder_by=HOLD)

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
            tone, mouth.tone = mouth.tone, Warble(TONE_HZ)
            mouth.speaking = True
            await until(
                lambda: band_db(ear.recent(0.5), RATE, TONE_HZ, 300) > HEARD, 10, "the warble at US"
            )
            leg = link_leg(us)
            relay.impair = wan
            await until(
                lambda: leg.stats()["jitter_buffer_seconds"] > HOLD - 0.02,
                10,
                "US's buffer behind the held packets",
            )
            before = leg.stats()
            relay.up.trace = trace = []
            relay.impair = Impairment(reorder=wan.reorder, reorder_by=HOLD, loss=0.08)
            await until(lambda: lost_at(trace) >= 25, 30, "25 packets lost")
            relay.impair = wan
            relay.up.trace = None
            arrived = leg.stats()["packets_in"]
            # The packets after the last loss reached US: it has played that loss by now.
            await until(lambda: leg.stats()["packets_in"] > arrived + 15, 10, "later packets")
            after = leg.stats()
            fates = {}
            for head, fate, _ in trace:
                if head[1] & 0x7F == OPUS:
                    fates[int.from_bytes(head[2:4], "big")] = fate
            lost = [seq for seq, fate in fates.items() if fate == "lost"]
            in_hand = [seq for seq in lost if fates.get((seq + 1) & 0xFFFF) == "sent"]
            recovered = after["fec_recovered"] - before["fec_recovered"]
            late = after["packets_late"] - before["packets_late"]
            plc = (after["concealed_samples"] - before["concealed_samples"]) // round(0.02 * RATE)
            figures = (len(lost), len(in_hand), recovered, late, plc)
            print("lost, successor in hand, recovered, late, concealed:", figures)
            assert len(lost) >= 25 and in_hand, figures
            # Each loss whose successor was in hand is rebuilt from FEC (one spared for a
            # busy machine's tick so late that the successor missed its turn) ...
            assert recovered >= len(in_hand) - 1, figures
            # ... and the counter is honest: only packets missing at playout are rebuilt,
            # and every missing one not rebuilt is concealed.
            assert recovered <= len(lost) + late, figures
            assert recovered + plc >= len(lost), figures
            mouth.tone = tone  # the steady tone again: it comes through whole
            await until(
                lambda: abs(dominant_hz(ear.recent(0.5), RATE) - TONE_HZ) < 20,
                10,
                "the steady tone after",
            )
            await until(lambda: ear.level(TONE_HZ, 0.5) > HEARD, 10, "the tone at its level")

    run(main())


def lost_at(trace: list) -> int:
    """Datagrams lost so far in ``trace``."""
    return sum(fate == "lost" for _, fate, _ in trace)


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
