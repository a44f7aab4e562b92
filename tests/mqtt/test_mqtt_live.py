"""MQTT against a real mosquitto: events, retained state, commands checked by audio, restarts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from gateway.monitoring.metrics import SERVICE_STATS
from mqtt_support import Broker, Probe, Subscriber, dominant_hz, http_get, live_site, rms_dbfs
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ConfigError, parse_config
from tests.waiting import until

PREFIX = "borderlink/test-site"


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path)
    b.start()
    yield b
    b.kill()


def site(broker_port: int, body: str, mqtt_extra: str = "", audit: Path | None = None) -> str:
    audit_section = f'[audit]\npath = "{audit}"\n' if audit else ""
    return f"""
[site]
name = "MQTT test"
country = "CA"

[web]
port = 0

{audit_section}
[mqtt]
port = {broker_port}
site_id = "test-site"
reconnect_min = "200ms"
reconnect_max = "2s"
{mqtt_extra}

{body}
"""


RADIOS = """
[ports.boat]
kind = "simulated_radio"
agency = "USCG"
tone_hz = 1000
talk_every = "10s"
talk_for = "800ms"
talk_offset = "500ms"
ptt_hang_time = "200ms"

[ports.shore]
kind = "simulated_radio"
agency = "RCMP"
talk_offset = "1h"
ptt_hang_time = "200ms"

[talkgroups.marine]
members = ["boat", "shore"]
"""


def metric(text: str, name: str, **labels: str) -> float:
    """The one sample called ``name`` whose labels include ``labels``."""
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def test_a_keying_radio_shows_in_metrics_mqtt_and_the_audit_log(
    tmp_path: Path, broker: Broker
) -> None:
    audit = tmp_path / "audit.jsonl"

    async def scenario() -> None:
        async with (
            Subscriber(broker.port, f"{PREFIX}/#") as sub,
            live_site(tmp_path, site(broker.port, RADIOS, audit=audit)) as gw,
        ):
            await until(
                lambda: sub.on("/event/ptt_on") and sub.on("/event/talk_start"),
                10,
                "MQTT ptt_on and talk_start events",
            )
            ptt = sub.on("/event/ptt_on")[0]
            assert (ptt["port"], ptt["talkgroup"], ptt["talkers"]) == ("shore", "marine", ["boat"])
            talk = sub.on("/event/talk_start")[0]
            assert (talk["talker"], talk["talkgroup"]) == ("boat", "marine")
            # The metric moved with it (the over lasts 800 ms: read while it is on the air).
            text = (await http_get(gw, "/metrics"))[1]
            assert metric(text, "borderlink_port_talking", port="boat") == 1
            # Retained port state followed the over.
            await until(
                lambda: any(p and p["talking"] for p in sub.on("/state/ports/boat")),
                10,
                "retained state showing boat talking",
            )
            await until(lambda: sub.on("/event/ptt_off"), 10, "the ptt_off event")
            off = sub.on("/event/ptt_off")[0]
            assert off["port"] == "shore" and off["seconds"] == pytest.approx(1.0, abs=0.021)
            text = (await http_get(gw, "/metrics"))[1]
            sent = metric(text, "borderlink_port_transmit_seconds_total", port="shore")
            assert sent == pytest.approx(off["seconds"], abs=1e-6)  # the same over, counted once
            assert metric(text, "borderlink_mqtt_connected") == 1
            assert metric(text, "borderlink_mqtt_events_published_total") >= 4
            exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()}
            for key, (name, *_) in SERVICE_STATS.items():  # what dashboards may name, live
                if key.startswith(("mqtt_", "audit_")):
                    assert "borderlink_" + name in exported, name
            records = [json.loads(x) for x in audit.read_text().splitlines()]
            transmit = [r for r in records if r["event"] == "transmit"]
            assert transmit and transmit[0]["port"] == "shore"
            assert transmit[0]["duration_seconds"] == pytest.approx(off["seconds"], abs=1e-6)
            assert sub.on("/status")[-1] == "online"

    asyncio.run(scenario())


PATCHABLE = """
[ports.boat]
kind = "tone"
tone_hz = 1000
level_dbfs = -12

[ports.beacon]
kind = "tone"
tone_hz = 400
level_dbfs = -70
talk_offset = "1h"

[talkgroups.marine]
members = ["boat"]

[talkgroups.land]
members = ["beacon"]

[patches.pursuit]
talkgroups = ["marine", "land"]
enabled = false
"""
COMMANDERS = """
[mqtt.commanders]
cad1 = ["patch", "unpatch", "unkey", "release", "floor"]
viewer = ["floor"]
"""


def test_patch_commands_change_what_the_other_talkgroup_hears(
    tmp_path: Path, broker: Broker
) -> None:
    async def scenario() -> None:
        async with (
            Subscriber(broker.port, f"{PREFIX}/#") as sub,
            live_site(tmp_path, site(broker.port, PATCHABLE, COMMANDERS)) as gw,
        ):
            probe = Probe("land-listener", gw.config.timing)
            gw.engine.attach(probe, "land")
            await until(lambda: len(probe.heard) >= 25, 10, "half a second of land audio")
            assert rms_dbfs(probe.recent(25)) < -100  # unpatched: land hears nothing

            async def command(body: dict, sender: str = "cad1") -> dict:
                before = len(sub.on(f"/reply/{sender}"))
                await sub.publish(f"{PREFIX}/command/{sender}", json.dumps(body))
                await until(
                    lambda: len(sub.on(f"/reply/{sender}")) > before, 10, f"a reply to {body}"
                )
                return sub.on(f"/reply/{sender}")[-1]

            reply = await command({"id": "p1", "action": "patch", "patch": "pursuit"})
            assert reply == {
                "id": "p1",
                "ok": True,
                "action": "patch",
                "patch": "pursuit",
                "active": True,
            }
            mark = len(probe.heard)
            await until(lambda: len(probe.heard) >= mark + 25, 10, "land audio after the patch")
            heard = probe.recent(25)
            assert dominant_hz(heard, gw.engine.rate) == pytest.approx(1000, abs=20)
            assert rms_dbfs(heard) == pytest.approx(-12, abs=1.0)
            await until(
                lambda: any(p and p["active"] for p in sub.on("/state/patches/pursuit")),
                10,
                "retained patch state",
            )
            assert sub.on("/event/patch")[-1]["patch"] == "pursuit"

            # Force-unkey the listener: it is sent nothing until released.
            reply = await command({"id": 2, "action": "unkey", "port": "land-listener"})
            assert reply["ok"] and reply["tx_inhibit"] is True
            mark = len(probe.heard)
            await until(lambda: len(probe.heard) >= mark + 10, 10, "audio after the unkey")
            assert rms_dbfs(probe.recent(10)) < -100
            assert (await command({"id": 3, "action": "release", "port": "land-listener"}))["ok"]
            mark = len(probe.heard)
            await until(lambda: len(probe.heard) >= mark + 10, 10, "audio after the release")
            assert dominant_hz(probe.recent(10), gw.engine.rate) == pytest.approx(1000, abs=20)

            reply = await command(
                {"id": 4, "action": "floor", "talkgroup": "land", "mode": "single"}
            )
            assert reply["ok"] and gw.engine.talkgroups["land"].floor == "single"

            reply = await command({"id": "p5", "action": "unpatch", "patch": "pursuit"})
            assert reply["ok"] and reply["active"] is False
            mark = len(probe.heard)
            await until(lambda: len(probe.heard) >= mark + 25, 10, "land audio after the unpatch")
            assert rms_dbfs(probe.recent(25)) < -100

            # A run-time port (a call, a console) joining and leaving is published too.
            joined = [e for e in sub.on("/event/joined") if e["port"] == "land-listener"]
            assert joined and joined[0]["kind"] == "probe" and joined[0]["talkgroup"] == "land"
            gw.engine.detach(probe)
            await until(
                lambda: any(e["port"] == "land-listener" for e in sub.on("/event/left")),
                10,
                "the left event",
            )
            await until(
                lambda: sub.on("/state/ports/land-listener")[-1] is None,
                10,
                "the retained state of the departed port to be cleared",
            )

    asyncio.run(scenario())


def test_malformed_and_unauthorised_commands_are_refused_with_a_reason(
    tmp_path: Path, broker: Broker
) -> None:
    audit = tmp_path / "audit.jsonl"
    cases = [
        ("cad1", b"patch pursuit please", "not valid JSON"),
        ("cad1", b"[1, 2]", "must be a JSON object"),
        ("cad1", b'{"id": 1, "action": "explode"}', "unknown action 'explode'; use one of: patch"),
        ("cad1", b'{"id": 2, "action": "patch"}', "'patch' needs 'patch' (one of: pursuit)"),
        (
            "cad1",
            b'{"id": 3, "action": "patch", "patch": "invasion"}',
            "no patch named 'invasion'; configured: pursuit",
        ),
        ("cad1", b'{"id": 4, "action": "unkey", "port": "nobody"}', "no port named 'nobody'"),
        (
            "cad1",
            b'{"id": 5, "action": "floor", "talkgroup": "land", "mode": "loud"}',
            "no mode named 'loud'; configured: mix, single",
        ),
        ("cad1", b"x" * 5000, "the limit is 4096"),
        (
            "mallory",
            b'{"id": 6, "action": "patch", "patch": "pursuit"}',
            "not authorised: sender 'mallory' is not in [mqtt.commanders]",
        ),
        (
            "viewer",
            b'{"id": 7, "action": "patch", "patch": "pursuit"}',
            "not authorised: sender 'viewer' may not 'patch' (allowed: floor)",
        ),
    ]

    async def scenario() -> None:
        async with (
            Subscriber(broker.port, f"{PREFIX}/#") as sub,
            live_site(tmp_path, site(broker.port, PATCHABLE, COMMANDERS, audit=audit)) as gw,
        ):
            for sender, payload, reason in cases:
                before = len(sub.on(f"/reply/{sender}"))
                await sub.publish(f"{PREFIX}/command/{sender}", payload)
                await until(
                    lambda s=sender, b=before: len(sub.on(f"/reply/{s}")) > b,
                    10,
                    f"a reply to {payload[:40]!r}",
                )
                reply = sub.on(f"/reply/{sender}")[-1]
                assert reply["ok"] is False, reply
                assert reason in reply["error"], (reason, reply)
                if payload.startswith(b'{"id"'):  # the commander's reference comes back
                    assert reply["id"] == json.loads(payload)["id"], reply
            assert "pursuit" not in gw.engine.active_patches  # nothing refused was done
            # The command path still works after all that.
            await sub.publish(
                f"{PREFIX}/command/cad1", b'{"id": 9, "action": "patch", "patch": "pursuit"}'
            )
            await until(
                lambda: "pursuit" in gw.engine.active_patches, 10, "the valid patch command"
            )
            for body in (
                {"id": "u1", "action": "unkey", "port": "boat"},
                {"id": "r1", "action": "release", "port": "boat"},
                {"id": "f1", "action": "floor", "talkgroup": "land", "mode": "single"},
            ):
                before = len(sub.on("/reply/cad1"))
                await sub.publish(f"{PREFIX}/command/cad1", json.dumps(body).encode())
                await until(
                    lambda b=before: len(sub.on("/reply/cad1")) > b, 10, f"a reply to {body}"
                )
                assert sub.on("/reply/cad1")[-1]["ok"] is True
            text = (await http_get(gw, "/metrics"))[1]
            assert metric(text, "borderlink_mqtt_commands_total", result="rejected") == 8
            assert metric(text, "borderlink_mqtt_commands_total", result="unauthorised") == 2
            assert metric(text, "borderlink_mqtt_commands_total", result="accepted") == 4
        records = [json.loads(x) for x in audit.read_text().splitlines()]
        commands = [r for r in records if r["event"] == "command"]
        assert len(commands) == 14 and [c["ok"] for c in commands].count(True) == 4
        assert any(c["sender"] == "mallory" and not c["ok"] for c in commands)
        assert commands[2]["id"] == "1" and commands[2]["action"] == "explode"
        done = {c["id"]: c for c in commands if c["ok"]}
        picked = ("sender", "action", "patch", "port", "talkgroup", "old", "new")

        def fields(record: dict) -> dict:
            return {k: v for k, v in record.items() if k in picked}

        assert fields(done["9"]) == {
            "sender": "cad1",
            "action": "patch",
            "patch": "pursuit",
            "old": "off",
            "new": "on",
        }
        # The patch's own record says who asked, with which command, and old → new.
        patch = next(r for r in records if r["event"] == "patch")
        assert {k: patch[k] for k in ("patch", "old", "state", "by", "id")} == {
            "patch": "pursuit",
            "old": "off",
            "state": "on",
            "by": "mqtt:cad1",
            "id": "9",
        }
        assert fields(done["u1"]) == {
            "sender": "cad1",
            "action": "unkey",
            "port": "boat",
            "talkgroup": "marine",
            "old": "allowed",
            "new": "inhibited",
        }
        assert fields(done["r1"]) == {
            "sender": "cad1",
            "action": "release",
            "port": "boat",
            "talkgroup": "marine",
            "old": "inhibited",
            "new": "allowed",
        }
        assert fields(done["f1"]) == {
            "sender": "cad1",
            "action": "floor",
            "talkgroup": "land",
            "old": "mix",
            "new": "single",
        }

    asyncio.run(scenario())


TONES_ONLY = """
[ports.a]
kind = "tone"

[ports.b]
kind = "tone"

[talkgroups.marine]
members = ["a"]

[talkgroups.land]
members = ["b"]

[patches.pursuit]
talkgroups = ["marine", "land"]
enabled = false
"""


def test_broker_restart_reconnects_republishes_and_delivers_the_bounded_buffer(
    tmp_path: Path, broker: Broker
) -> None:
    # reconnect_min 3 s: after the broker comes back, the test's subscriber is in
    # place well before the gateway's next attempt, so it sees what is re-sent.
    extra = 'buffer = 4\nreconnect_min = "3s"\nreconnect_max = "6s"\n'
    body = site(broker.port, TONES_ONLY, extra).replace(
        'reconnect_min = "200ms"\nreconnect_max = "2s"\n', ""
    )

    async def scenario() -> None:
        async with live_site(tmp_path, body) as gw:
            mqtt = gw.mqtt
            await until(lambda: mqtt.connected and not mqtt.events, 10, "the first connection")
            broker.kill()
            await until(lambda: not mqtt.connected, 10, "the gateway to notice the broker is gone")
            status, _ = await http_get(gw, "/healthz")
            assert status == 200  # audio goes on without the broker
            for on in (True, False, True, False, True, True):
                if on != ("pursuit" in gw.engine.active_patches):
                    gw.engine.set_patch("pursuit", on)
            gw.engine.set_tx_inhibit("b", True)  # a state change that makes no event
            assert mqtt.stats()["mqtt_events_buffered"] == 4  # 5 patch events, buffer of 4
            assert mqtt.stats()["mqtt_events_dropped"] == 1
            broker.start()  # a fresh broker: no retained messages, no sessions
            async with Subscriber(broker.port, f"{PREFIX}/#") as sub:
                assert not mqtt.connected
                await until(lambda: mqtt.connected, 15, "the gateway to reconnect")
                await until(lambda: len(sub.on("/event/patch")) == 4, 10, "the 4 buffered events")
                patches = sub.on("/event/patch")
                seqs = [p["seq"] for p in patches]
                assert seqs == list(range(seqs[0], seqs[0] + 4))  # the newest four, in order
                assert [p["active"] for p in patches] == [False, True, False, True]
                # Retained state goes out ports, talkgroups, patches: the patch comes last.
                await until(lambda: sub.on("/state/patches/pursuit"), 10, "republished state")
                land = sub.on("/state/talkgroups/land")[-1]
                assert land["patched"] is True and land["mix_group"] == "marine+land"
                assert sub.on("/state/ports/b")[-1]["tx_inhibit"] is True
                assert sub.on("/state/patches/pursuit")[-1]["active"] is True
                assert sub.on("/status")[-1] == "online"
            text = (await http_get(gw, "/metrics"))[1]
            assert metric(text, "borderlink_mqtt_reconnects_total") == 1
            assert metric(text, "borderlink_mqtt_events_dropped_total") == 1
            assert metric(text, "borderlink_mqtt_connected") == 1

    asyncio.run(scenario())


def test_the_gateway_runs_with_the_broker_down_and_connects_when_it_appears(
    tmp_path: Path,
) -> None:
    broker = Broker(tmp_path)  # not started yet

    async def scenario() -> None:
        async with live_site(tmp_path, site(broker.port, TONES_ONLY)) as gw:
            ticks = gw.clock.ticks
            await until(lambda: gw.clock.ticks > ticks + 25, 10, "the media clock to keep ticking")
            text = (await http_get(gw, "/metrics"))[1]
            assert metric(text, "borderlink_mqtt_connected") == 0
            broker.start()
            try:
                async with Subscriber(broker.port, f"{PREFIX}/status") as sub:
                    await until(
                        lambda: "online" in sub.on("/status"), 10, "the gateway's online status"
                    )
            finally:
                broker.kill()

    asyncio.run(scenario())


def test_mqtt_section_errors_name_the_fix() -> None:
    text = (
        '[site]\nname="x"\ncountry="US"\n[mqtt]\nsite_id="a/b"\n[mqtt.commanders]\ncad=["launch"]\n'
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    message = str(err.value)
    assert "mqtt.site_id" in message and "MQTT topic level" in message
    assert "mqtt.commanders.cad" in message and "'patch'" in message


def test_tone_checks_can_fail() -> None:
    """The audio measures used above tell a 1 kHz tone from silence and from 400 Hz."""
    t = np.arange(1600) / 16000
    assert dominant_hz(np.sin(2 * np.pi * 400 * t), 16000) == pytest.approx(400, abs=20)
    assert rms_dbfs(np.zeros(100)) < -100


def test_a_reload_by_mqtt_turns_a_patch_on_with_an_event_and_audit_lines(
    tmp_path: Path, broker: Broker
) -> None:
    audit = tmp_path / "audit.jsonl"
    commanders = '[mqtt.commanders]\ncad1 = ["reload"]\n'
    text = site(broker.port, PATCHABLE, commanders, audit=audit)

    async def scenario() -> None:
        async with (
            Subscriber(broker.port, f"{PREFIX}/#") as sub,
            live_site(tmp_path, text) as gw,
        ):
            assert gw.config.source is not None
            gw.config.source.write_text(text.replace("enabled = false", "enabled = true"))
            await sub.publish(f"{PREFIX}/command/cad1", b'{"id": "rl-1", "action": "reload"}')
            await until(lambda: sub.on("/reply/cad1"), 10, "the reply to reload")
            reply = sub.on("/reply/cad1")[-1]
            assert reply["ok"] is True and reply["id"] == "rl-1", reply
            assert "pursuit" in gw.engine.active_patches
            await until(lambda: sub.on("/event/patch"), 10, "the patch event")
            assert sub.on("/event/patch")[-1] | {"seq": 0, "ts": 0} == {
                "seq": 0,
                "ts": 0,
                "event": "patch",
                "patch": "pursuit",
                "active": True,
            }

    asyncio.run(scenario())
    records = [json.loads(x) for x in audit.read_text().splitlines()]
    kinds = [r["event"] for r in records]
    patch = records[kinds.index("patch")]
    assert (patch["patch"], patch["old"], patch["state"]) == ("pursuit", "off", "on")
    assert (patch["by"], patch["id"]) == ("reload:mqtt:cad1", "rl-1")  # who asked, how
    reload = records[kinds.index("reload")]
    assert reload["by"] == "mqtt:cad1" and reload["ok"] is True and reload["id"] == "rl-1"
    assert reload["changes"] == "patches ~pursuit"
    command = records[kinds.index("command")]
    assert (command["action"], command["id"], command["ok"]) == ("reload", "rl-1", True)
