"""The trunk between two real gateways on loopback over TLS: shared talkgroups carry audio
both ways, nothing else crosses, a cut from either side stops it, a restore brings it back.

Audio is judged by content: each talkgroup's radio speaks its own tone, and what the
radios on the other side hear is measured in that tone's band (band_db).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from gateway.monitoring.metrics import SiteMetrics
from trunk_sites import (
    LinkSpec,
    SiteSpec,
    both_up,
    free_port,
    link_legs,
    make_pki,
    radio,
    running,
    share_state,
    site_toml,
    srtp_legs,
)

from tests.mqtt.mqtt_support import Broker, Subscriber
from tests.sip.sip_peers import run
from tests.waiting import until

HEARD = -40.0  # a tone at -20 dBFS arrives around -20..-26 dB through G.711
SILENT = -70.0
# Beside a tone that is heard: a leak arrives at about its level (issue #15's: -31 dB),
# while G.711 puts products of a tone in other bands (µ-law's error on 700 Hz repeats
# every 10 ms: energy at every multiple of 100 Hz, 1000 Hz included, seen at -55 dB) and
# concealed late packets click into every band. A leak is above this, those below.
NO_LEAK = -45.0


def leaked(heard, hz: float) -> bool:  # noqa: ANN001 - a LinkRadio
    """``hz`` is there as a tone: above NO_LEAK and 10 dB above the bands beside it.
    A leak is another talkgroup's tone (a narrow peak); clicks of concealed packets on a
    busy machine spread over every band alike."""
    level = heard.level(hz)
    beside = max(heard.level(hz - 150.0), heard.level(hz + 150.0))
    return level > NO_LEAK and level > beside + 10.0


def two_sites(tmp: Path, ca_share: dict[str, str], us_share: dict[str, str], ca_extra: str = ""):
    pki = make_pki(tmp, ("ca", "us"))
    ca = SiteSpec("ca", {"marine": 1000.0, "police": 700.0}, [LinkSpec("us", "us", ca_share)])
    us = SiteSpec("us", {"harbor": 1500.0, "sheriff": 500.0}, [LinkSpec("ca", "ca", us_share)])
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    return site_toml(tmp, ca, ports, pki, ca_extra), site_toml(tmp, us, ports, pki)


def test_shared_talkgroup_carries_audio_both_ways_and_nothing_else(tmp_path: Path) -> None:
    ca_path, us_path = two_sites(tmp_path, {"marine": "shiprider"}, {"harbor": "shiprider"})

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us, "shiprider")
            assert len(link_legs(ca)) == 1 and len(link_legs(us)) == 1, "one dialog per name"
            assert srtp_legs(ca) == [True] and srtp_legs(us) == [True], "link media is SRTP"
            series = [
                line.split(" ")[0]
                for line in SiteMetrics.of(ca).render().decode().splitlines()
                if not line.startswith("#")
            ]
            assert not [s for s in series if "#" in s], "a metrics series per dialog"
            radio(ca, "marine").speaking = True
            radio(ca, "police").speaking = True  # unshared: must never cross
            await until(lambda: radio(us, "harbor").level(1000.0, 0.5) > HEARD, 15, "CA at US")
            await asyncio.sleep(1.0)
            assert radio(us, "harbor").level(1000.0) > HEARD
            assert not leaked(radio(us, "harbor"), 700.0), "an unshared talkgroup crossed"
            assert radio(us, "sheriff").level(1000.0) < SILENT
            assert radio(us, "sheriff").level(700.0) < SILENT
            radio(ca, "marine").speaking = radio(ca, "police").speaking = False
            radio(us, "harbor").speaking = True
            await until(lambda: radio(ca, "marine").level(1500.0, 0.5) > HEARD, 15, "US at CA")
            assert radio(ca, "police").level(1500.0) < SILENT
            # Still exactly one dialog per shared name after both sides dialled.
            assert len(link_legs(ca)) == 1 and len(link_legs(us)) == 1

    run(main())


def test_a_share_only_one_side_offers_carries_nothing(tmp_path: Path) -> None:
    # CA offers marine as "shiprider"; US offers harbor under another name only.
    ca_path, us_path = two_sites(tmp_path, {"marine": "shiprider"}, {"harbor": "fishery"})

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            radio(ca, "marine").speaking = radio(us, "harbor").speaking = True
            # Each side dials its own name and is refused (403, as for a name that
            # exists nowhere): count the refusals instead of waiting on a clock.
            await until(
                lambda: (
                    ca.links.trunks["us"].refused_invites >= 1
                    and us.links.trunks["ca"].refused_invites >= 1
                ),
                15,
                "each side to refuse the other's unshared name",
            )
            await asyncio.sleep(0.5)
            assert link_legs(ca) == [] and link_legs(us) == []
            assert radio(us, "harbor").level(1000.0) < SILENT
            assert radio(ca, "marine").level(1500.0) < SILENT
            assert share_state(ca, "us", "shiprider") == "down"

    run(main())


async def cli(config: Path, *args: str) -> dict:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "link",
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, (out + err).decode()
    return json.loads(out)


def records(path: Path, event: str) -> list[dict]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("event") == event]


def test_a_cut_from_either_side_stops_audio_both_ways_until_that_side_restores(
    tmp_path: Path,
) -> None:
    ca_path, us_path = two_sites(tmp_path, {"marine": "shiprider"}, {"harbor": "shiprider"})

    async def cut_and_restore(
        ca, us, cutter, other, cutter_path: Path, link: str, other_link: str
    ) -> None:  # noqa: ANN001
        await both_up(ca, us, "shiprider")
        radio(ca, "marine").speaking = radio(us, "harbor").speaking = True
        await until(
            lambda: (
                radio(us, "harbor").level(1000.0, 0.3) > HEARD
                and radio(ca, "marine").level(1500.0, 0.3) > HEARD
            ),
            10,
            "audio both ways",
        )
        reply = await cli(cutter_path, "cut", link, "--reason", "incident over")
        assert reply["state"] == "cut"
        assert link_legs(cutter) == [], "the leg left in the same call"
        await until(
            lambda: share_state(other, other_link, "shiprider") == "cut_by_peer",
            5,
            "the peer to show cut_by_peer",
        )
        text = SiteMetrics.of(other).render().decode()
        assert f'borderlink_link_state{{link="{other_link}",state="cut_by_peer"}} 1.0' in text
        assert (
            f'borderlink_link_share_state{{link="{other_link}",share="shiprider",state="up"}} 0.0'
            in text
        )
        mine = SiteMetrics.of(cutter).render().decode()
        assert f'borderlink_link_state{{link="{link}",state="cut"}} 1.0' in mine
        await asyncio.sleep(1.0)
        assert radio(us, "harbor").level(1000.0, 0.8) < SILENT
        assert radio(ca, "marine").level(1500.0, 0.8) < SILENT
        # The peer keeps trying (with backoff) and is refused.
        refused = cutter.links.trunks[link].refused_invites
        await until(
            lambda: cutter.links.trunks[link].refused_invites > refused,
            10,
            "the peer's redial to be refused",
        )
        assert link_legs(other) == [] and link_legs(cutter) == []
        cuts = records(tmp_path / f"{cutter.config.site.name}-audit.jsonl", "link_cut")
        assert cuts and cuts[-1]["reason"] == "incident over"
        assert cuts[-1]["who"].startswith("local:")
        await cli(cutter_path, "restore", link)
        await both_up(ca, us, "shiprider")
        await until(
            lambda: (
                radio(us, "harbor").level(1000.0, 0.3) > HEARD
                and radio(ca, "marine").level(1500.0, 0.3) > HEARD
            ),
            10,
            "audio both ways again",
        )
        radio(ca, "marine").speaking = radio(us, "harbor").speaking = False

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await cut_and_restore(ca, us, us, ca, us_path, "ca", "us")  # US cuts
            await cut_and_restore(ca, us, ca, us, ca_path, "us", "ca")  # then CA

    run(main())


def test_a_cut_survives_a_restart(tmp_path: Path) -> None:
    ca_path, us_path = two_sites(tmp_path, {"marine": "shiprider"}, {"harbor": "shiprider"})

    async def main() -> None:
        async with running(us_path) as us:
            async with running(ca_path) as ca:
                await both_up(ca, us, "shiprider")
                await cli(ca_path, "cut", "us", "--share", "shiprider")
                status = (await cli(ca_path, "status"))["links"]["us"]
                assert status["shares"] == {"shiprider": "cut"}
                assert status["cut"]["shiprider"]["who"].startswith("local:")
            async with running(ca_path) as ca:
                refused = ca.links.trunks["us"].refused_invites
                await until(
                    lambda: ca.links.trunks["us"].refused_invites > refused,
                    15,
                    "US's redial to be refused after CA's restart",
                )
                assert share_state(ca, "us", "shiprider") == "cut"
                assert link_legs(ca) == [] and link_legs(us) == []
                await cli(ca_path, "restore", "us", "--share", "shiprider")
                await both_up(ca, us, "shiprider")

    run(main())


def test_two_shared_names_each_carry_their_own_talkgroup(tmp_path: Path) -> None:
    """Two dialogs between the same two gateways (one RTP port each side, told apart by
    SSRC): each shared name's audio lands in its own talkgroup (issue #15: A's 500 Hz
    reached B's tgx)."""
    ca_path, us_path = two_sites(
        tmp_path,
        {"marine": "shiprider", "police": "lawnet"},
        {"harbor": "shiprider", "sheriff": "lawnet"},
    )

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us, "shiprider")
            await both_up(ca, us, "lawnet")
            assert len(link_legs(ca)) == 2 and len(link_legs(us)) == 2
            radio(ca, "marine").speaking = radio(ca, "police").speaking = True
            await until(
                lambda: (
                    radio(us, "harbor").level(1000.0, 0.3) > HEARD
                    and radio(us, "sheriff").level(700.0, 0.3) > HEARD
                ),
                10,
                "each name heard",
            )
            await asyncio.sleep(1.0)
            assert not leaked(radio(us, "harbor"), 700.0), "lawnet leaked into shiprider"
            assert not leaked(radio(us, "sheriff"), 1000.0), "shiprider leaked into lawnet"

    run(main())


async def ask(sub: Subscriber, sender: str, command: dict) -> dict:
    """Publish a command and wait for its reply."""
    before = len(sub.on(f"/reply/{sender}"))
    await sub.publish(f"borderlink/ca/command/{sender}", json.dumps(command))
    await until(lambda: len(sub.on(f"/reply/{sender}")) > before, 30, f"a reply to {sender}")
    return sub.on(f"/reply/{sender}")[-1]


def test_an_mqtt_command_cuts_and_restores_a_link(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    mqtt = f"""
[mqtt]
port = {broker.port}
site_id = "ca"
reconnect_min = "200ms"

[mqtt.commanders]
cad = ["link_cut", "link_restore"]
viewer = ["floor"]
"""
    ca_path, us_path = two_sites(tmp_path, {"marine": "shiprider"}, {"harbor": "shiprider"}, mqtt)

    async def main() -> None:
        async with (
            running(ca_path) as ca,
            running(us_path) as us,
            Subscriber(broker.port, "borderlink/ca/reply/#") as sub,
        ):
            await both_up(ca, us, "shiprider")
            await until(lambda: ca.mqtt.connected, 10, "the gateway on the broker")
            command = {"id": 1, "action": "link_cut", "link": "us", "reason": "drill"}
            refused = await ask(sub, "viewer", command)
            assert not refused["ok"] and "may not 'link_cut'" in refused["error"]
            assert share_state(ca, "us", "shiprider") == "up"
            reply = await ask(sub, "cad", command)
            assert reply["ok"], reply
            await until(
                lambda: share_state(us, "ca", "shiprider") == "cut_by_peer", 15, "US to see the cut"
            )
            cut = records(tmp_path / "ca-audit.jsonl", "link_cut")[-1]
            assert cut["who"] == "mqtt:cad" and cut["reason"] == "drill" and cut["via"] == "mqtt"
            done = [c for c in records(tmp_path / "ca-audit.jsonl", "command") if c["ok"]][-1]
            assert (done["id"], done["link"], done["old"], done["new"]) == ("1", "us", "up", "cut")
            restore = {"id": 2, "action": "link_restore", "link": "us"}
            assert (await ask(sub, "cad", restore))["ok"]
            await both_up(ca, us, "shiprider")

    try:
        run(main())
    finally:
        broker.stop()


def test_directions_meet_a_send_only_share_is_heard_but_does_not_hear(tmp_path: Path) -> None:
    ca_path, us_path = two_sites(
        tmp_path, {"marine": '{ as = "shiprider", direction = "send" }'}, {"harbor": "shiprider"}
    )

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us, "shiprider")
            radio(ca, "marine").speaking = radio(us, "harbor").speaking = True
            await until(lambda: radio(us, "harbor").level(1000.0, 0.3) > HEARD, 10, "CA at US")
            await asyncio.sleep(1.0)
            assert radio(ca, "marine").level(1500.0) < SILENT, "a send-only share heard the peer"

    run(main())


def test_the_backup_address_is_tried_when_the_peer_does_not_answer(tmp_path: Path) -> None:
    ca_path, us_path = two_sites(tmp_path, {"marine": "shiprider"}, {"harbor": "shiprider"})
    text = ca_path.read_text()
    real = text.split('[links.us]\npeer = "')[1].split('"')[0]
    dead = f"127.0.0.1:{free_port()}"  # nobody listens there
    ca_path.write_text(text.replace(f'peer = "{real}"', f'peer = "{dead}"\nbackup = "{real}"'))
    # US cannot reach CA at all: only CA's dial, through its backup, can bring the link up.
    text = us_path.read_text()
    to_ca = text.split('[links.ca]\npeer = "')[1].split('"')[0]
    us_path.write_text(text.replace(f'peer = "{to_ca}"', f'peer = "127.0.0.1:{free_port()}"'))

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us, "shiprider")
            dialog = ca.links.trunks["us"].names["shiprider"].dialog
            assert dialog is not None and not dialog.incoming, "CA's own dial (to the backup)"
            radio(ca, "marine").speaking = True
            await until(lambda: radio(us, "harbor").level(1000.0, 0.3) > HEARD, 10, "CA at US")

    run(main())


def test_a_reload_of_sip_keeps_the_link_and_its_cut(tmp_path: Path) -> None:
    ca_path, us_path = two_sites(tmp_path, {"marine": "shiprider"}, {"harbor": "shiprider"})

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us, "shiprider")
            legs = (link_legs(ca), link_legs(us))
            for site, path in ((ca, ca_path), (us, us_path)):
                tg = "marine" if site is ca else "harbor"
                path.write_text(
                    path.read_text()
                    + f"""
[sip.routes.7001]
talkgroup = "{tg}"
public = true
"""
                )
                assert (await site.reload_live()).ok
            await asyncio.sleep(1.5)  # a BYE would have been sent at once
            assert (link_legs(ca), link_legs(us)) == legs, "a [sip] reload dropped the link"
            await cli(ca_path, "cut", "us")
            us_path.write_text(
                us_path.read_text() + '\n[sip.routes.7002]\ntalkgroup = "sheriff"\npublic = true\n'
            )
            assert (await ca.reload_live()).ok and (await us.reload_live()).ok
            assert share_state(ca, "us", "shiprider") == "cut", "a reload lifted the cut"

    run(main())
