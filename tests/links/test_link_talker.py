"""Who is talking crosses the border, and one floor holds on both sides: two real gateways
on loopback over TLS and SRTP, each packet carrying the talker extension.

The far side names the real talker (console, audit, MQTT, metrics); a collision in a
``single`` talkgroup ends with the same holder on both sides and the busy tone for the
loser; an emergency pre-empts across the border; a peer's extension we will not believe
is dropped and counted, and its audio still plays. Audio is judged by content: each
side's radio speaks its own tone, and the busy tone is 480 + 620 Hz.
"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import aiohttp
from gateway.monitoring.metrics import SiteMetrics
from trunk_sites import (
    LinkSpec,
    SiteSpec,
    both_up,
    ear,
    link_legs,
    make_pki,
    radio,
    running,
    share_state,
    site_toml,
)

from gateway.webrtc.passwords import hash_password
from tests.mqtt.mqtt_support import Broker, Subscriber
from tests.sip.sip_peers import run
from tests.waiting import until

HEARD = -40.0
SILENT = -70.0
BUSY_HZ = 480.0  # one of the busy tone's two frequencies
LABEL = "RCMP · Marine 7"
PASSWORD = "dispatch-secret-7"


def sites(tmp: Path, floor: str = "mix", us_extra: str = "", listeners: bool = False):
    """CA (RCMP, talkgroup marine at 1000 Hz) and US (USCG, harbor at 1500 Hz), sharing
    them as ``shiprider``; each with a second radio that only listens if asked."""
    pki = make_pki(tmp, ("ca", "us"))
    ca = SiteSpec(
        "ca",
        {"marine": 1000.0},
        [LinkSpec("us", "us", {"marine": "shiprider"})],
        floor=floor,
        agency="RCMP",
        labels={"marine": "Marine 7"},
        listeners=("marine",) if listeners else (),
    )
    us = SiteSpec(
        "us",
        {"harbor": 1500.0},
        [LinkSpec("ca", "ca", {"harbor": "shiprider"})],
        floor=floor,
        agency="USCG",
        labels={"harbor": "Cutter 41"},
        listeners=("harbor",) if listeners else (),
    )
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    return site_toml(tmp, ca, ports, pki), site_toml(tmp, us, ports, pki, us_extra)


def records(path: Path, event: str) -> list[dict]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("event") == event]


def leg(gateway):  # noqa: ANN001
    (name,) = link_legs(gateway)
    return next(p for p in gateway.engine.ports if p.name == name)


def holder(gateway) -> str | None:  # noqa: ANN001
    """The site whose talker holds the shared floor, as this side sees it (one talker per
    site crosses, so the site names the holder on both sides)."""
    arbiter = getattr(gateway.engine, "shared_floors", None)
    floors = arbiter.floors if arbiter is not None else {}
    held = [f.holder for f in floors.values() if f.holder is not None]
    return held[0].site if held else None


def metric(gateway, name: str, **labels: str) -> float | None:  # noqa: ANN001
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in SiteMetrics.of(gateway).render().decode().splitlines():
        if line.startswith(f"borderlink_{name}{{{wanted}}} "):
            return float(line.split()[-1])
    return None


def test_the_far_side_names_the_real_talker(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    us_extra = f"""
[mqtt]
port = {broker.port}
site_id = "us"
reconnect_min = "200ms"

[web]
host = "127.0.0.1"
port = 0

[console]
ice_addresses = ["127.0.0.1"]

[console.operators.dispatch]
password_hash = "{hash_password(PASSWORD)}"
agency = "USCG"
talk = ["*"]
"""
    ca_path, us_path = sites(tmp_path, us_extra=us_extra)
    us_audit = tmp_path / "us-audit.jsonl"

    async def who_talks(http: aiohttp.ClientSession, base: str) -> list[str]:
        state = await (await http.get(f"{base}/api/console/state")).json()
        return [t["who"] for tile in state["talkgroups"] for t in tile["talkers"]]

    async def main() -> None:
        jar = aiohttp.CookieJar(unsafe=True)
        async with (
            running(ca_path) as ca,
            running(us_path) as us,
            Subscriber(broker.port, "borderlink/us/event/#") as events,
            aiohttp.ClientSession(cookie_jar=jar) as http,
        ):
            await both_up(ca, us)
            await until(lambda: us.mqtt.connected, 10, "the US gateway on the broker")
            base = f"http://127.0.0.1:{us.web.port}"
            me = {"operator": "dispatch", "password": PASSWORD}
            login = await http.post(f"{base}/api/console/login", json=me)
            assert login.status == 200

            radio(ca, "marine").speaking = True
            await until(lambda: radio(us, "harbor").level(1000.0, 0.3) > HEARD, 5, "CA at US")
            assert await who_talks(http, base) == [LABEL], "the US console's who-is-talking"
            assert leg(us).onair is not None, "the talker extension was not agreed in SDP"
            assert leg(us).talker == LABEL
            assert metric(us, "link_peer_talking", link="ca", share="shiprider") == 1.0
            # The label comes in the dialog, the over's first packet may beat it: until then
            # the far side names the peer's site (both gateways share one loop here, so a US
            # tick can read CA's first packet before the loop reads CA's INFO).
            named = (LABEL, "ca")
            await until(
                lambda: [e for e in events.on("/event/talk_start") if e.get("talker") in named],
                5,
                "MQTT talk_start",
            )
            starts = records(us_audit, "talk_start")
            assert [r["talker"] in named for r in starts if r["port"] == leg(us).name] == [True]

            radio(ca, "marine").speaking = False
            await until(lambda: records(us_audit, "link_talker"), 5, "the over audited")
            (over,) = records(us_audit, "link_talker")
            assert over["label"] == LABEL and over["link"] == "ca" and over["share"] == "shiprider"
            assert over["talker_id"] >= 1 and over["seconds"] > 0 and not over["emergency"]
            await until(lambda: records(us_audit, "talk"), 5, "the talk record")
            (talk,) = records(us_audit, "talk")
            assert talk["talker"] == LABEL and talk["port"] == leg(us).name
            await until(lambda: events.on("/event/talk_stop"), 5, "MQTT talk_stop")
            assert events.on("/event/talk_stop")[-1]["talker"] == LABEL
            assert metric(us, "link_peer_talking", link="ca", share="shiprider") == 0.0
            # The other way: the CA side names the US talker by its agency and label.
            radio(us, "harbor").speaking = True
            await until(lambda: leg(ca).talker == "USCG · Cutter 41", 5, "the US label at CA")
            await until(lambda: radio(ca, "marine").level(1500.0, 0.3) > HEARD, 5, "US at CA")
            assert not records(tmp_path / "ca-audit.jsonl", "link_talker")  # US still talking

    try:
        run(main())
    finally:
        broker.stop()


async def collision_settled(winner, w_tg: str, w_hz: float, loser, l_tg: str, l_hz: float):  # noqa: ANN001
    """The loser hears the busy tone; the holder is heard on the loser's side (by its
    listening radio); once the sides agree (a round trip: until then each side heard its
    own), the loser is heard nowhere, and that holds."""
    await until(lambda: radio(loser, l_tg).level(BUSY_HZ, 0.5) > HEARD, 5, "the loser busy")
    await until(
        lambda: ear(loser, l_tg).level(w_hz, 0.3) > HEARD, 5, "the holder heard across the border"
    )
    await until(lambda: ear(winner, w_tg).level(l_hz, 0.3) < SILENT, 5, "the loser unheard")
    won = holder(winner)
    for _ in range(10):  # the sides do not flap
        assert holder(winner) == holder(loser) == won
        await asyncio.sleep(0.05)
    assert ear(winner, w_tg).level(l_hz, 0.4) < SILENT
    assert radio(winner, w_tg).level(l_hz, 0.4) < SILENT
    assert radio(winner, w_tg).level(BUSY_HZ, 0.4) < SILENT
    assert radio(loser, l_tg).level(BUSY_HZ, 1.0) > HEARD  # (its cadence: 0.5 s on, 0.5 off)


def test_simultaneous_key_up_converges_on_one_holder_and_the_loser_hears_busy(
    tmp_path: Path,
) -> None:
    ca_path, us_path = sites(tmp_path, floor="single", listeners=True)

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us)

            def busy(gateway, talkgroup: str) -> bool:  # noqa: ANN001
                return radio(gateway, talkgroup).level(BUSY_HZ, 1.0) > HEARD  # 0.5 s on/off

            for _ in range(3):
                # Both key in the same moment (the same turn of the loop both ticks run on).
                radio(ca, "marine").speaking = radio(us, "harbor").speaking = True
                await until(
                    lambda: busy(ca, "marine") != busy(us, "harbor"),
                    5,
                    "one radio, and only one, to hear the busy tone",
                )
                await until(
                    lambda: holder(ca) is not None and holder(ca) == holder(us),
                    5,
                    "both sides to agree on the holder",
                )
                won = holder(ca)
                assert won == ("us" if busy(ca, "marine") else "ca"), "the busy one holds"
                if won == "ca":
                    await collision_settled(ca, "marine", 1000.0, us, "harbor", 1500.0)
                else:
                    await collision_settled(us, "harbor", 1500.0, ca, "marine", 1000.0)
                radio(ca, "marine").speaking = radio(us, "harbor").speaking = False
                await until(lambda: holder(ca) is None and holder(us) is None, 5, "floor free")
                await until(
                    lambda: not busy(ca, "marine") and not busy(us, "harbor"),
                    5,
                    "the busy tone over (the next try starts clean)",
                )

    run(main())


def test_an_emergency_pre_empts_across_the_border(tmp_path: Path) -> None:
    ca_path, us_path = sites(tmp_path, floor="single", listeners=True)
    us_audit = tmp_path / "us-audit.jsonl"

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us)
            radio(us, "harbor").speaking = True
            await until(lambda: ear(ca, "marine").level(1500.0, 0.3) > HEARD, 5, "US at CA")
            # A later, ordinary CA key-up does not take it: it hears the busy tone.
            radio(ca, "marine").speaking = True
            await until(lambda: radio(ca, "marine").level(BUSY_HZ, 0.5) > HEARD, 5, "CA busy")
            # The CA radio presses its emergency button: it takes the floor on both sides.
            radio(ca, "marine").emergency = True
            await until(
                lambda: ear(us, "harbor").level(1000.0, 0.3) > HEARD,
                5,
                "the emergency heard in the US",
            )
            await until(lambda: holder(ca) == holder(us) == "ca", 5, "the emergency to hold")
            assert [
                r["port"]
                for r in records(tmp_path / "ca-audit.jsonl", "floor_granted")
                if r.get("talker") == LABEL
            ], "the emergency's grant audited at CA"
            await until(
                lambda: ear(us, "harbor").level(1500.0, 0.3) < SILENT,
                5,
                "the pre-empted US radio unheard",
            )
            # The pre-empted US radio, still keyed, hears the emergency, not the busy tone
            # (as it would a local emergency): the busy tone's cadence is 0.5 s on, 0.5 off.
            await until(
                lambda: radio(us, "harbor").level(1000.0, 0.5) > HEARD,
                5,
                "the emergency heard by the radio it pre-empted",
            )
            await asyncio.sleep(0.5)
            # (the busy tone, when it plays, is at -24 dB over its cadence; late packets of
            # the far tone under load leave artefacts near -50 dB in its band)
            assert radio(us, "harbor").level(BUSY_HZ, 1.0) < -40, "the busy tone, not the SOS"
            assert radio(us, "harbor").level(1000.0, 1.0) > HEARD
            assert (
                leg(us).emergency
                and metric(us, "link_peer_emergency", link="ca", share="shiprider") == 1.0
            )
            await until(lambda: records(us_audit, "preempted"), 5, "the pre-emption audited")
            pre = records(us_audit, "preempted")[-1]
            assert pre["port"] == "harbor-radio" and pre["by"] == LABEL, pre
            # The emergency lets go: the US radio, still keyed, gets the floor back on both.
            radio(ca, "marine").speaking = False
            await until(lambda: holder(ca) == holder(us) == "us", 5, "the US back")
            await until(lambda: ear(ca, "marine").level(1500.0, 0.3) > HEARD, 5, "US again")

    run(main())


def two_byte(data: bytes, profile: int = 0x1000) -> bytes:
    """One RFC 8285 two-byte element with ID 1 (ours), padded, behind its header."""
    body = bytes((1, len(data))) + data
    body += bytes(-len(body) % 4)
    return struct.pack("!HH", profile, len(body) // 4) + body


KEYED = bytes((0x20, 9, 0, 0, 0, 1))  # keyed, talker 9, key-up 1
BAD_BLOCKS = {
    "version": two_byte(bytes((0x60, 9, 0, 0, 0, 1))),  # a version we do not read
    "profile": two_byte(KEYED, profile=0xABCD),  # not an RFC 8285 extension
    "element": struct.pack("!HH", 0x1000, 1) + bytes((1, 40, 0x20, 9)),  # runs past the end
}


def test_a_peers_extension_we_will_not_believe_is_dropped_and_counted(tmp_path: Path) -> None:
    """The CA gateway turns hostile: its link leg sends crafted extension blocks in its real
    (SRTP) packets. The US side counts each by reason, believes none (no talker, no key),
    keeps playing the audio, and the link stays up."""
    ca_path, us_path = sites(tmp_path)

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us)
            hostile = leg(ca)
            radio(ca, "marine").speaking = True
            for reason, block in BAD_BLOCKS.items():
                assert len(block) % 4 == 0, reason
                hostile.onair.say = lambda talker, b=block: hostile.bank.extensions.set_extension(
                    hostile.row, b
                )  # every packet from now on carries it
                hostile.bank.extensions.set_extension(hostile.row, block)
                await until(
                    lambda r=reason: us.links.trunks["ca"].talker_rejected[r] > 10,
                    5,
                    f"{reason} counted",
                )
                heard = leg(us).onair.heard
                assert not (heard and heard.keyed), "a bad block believed"
                assert radio(us, "harbor").level(1000.0, 0.3) > HEARD, "the audio was dropped"
                assert metric(us, "link_talker_rejected_total", link="ca", reason=reason) > 10
            del hostile.onair.say  # honest again
            hostile.onair._sent = None  # noqa: SLF001  (so the next words are sent)
            await until(lambda: leg(us).talker == LABEL, 5, "a good block believed again")
            await until(lambda: radio(us, "harbor").level(1000.0, 0.3) > HEARD, 5, "audio back")
            assert share_state(us, "ca", "shiprider") == "up" and len(link_legs(us)) == 1

    run(main())
