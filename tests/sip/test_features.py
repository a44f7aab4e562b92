"""DTMF PTT, dial-out patches, registrar restarts and junk on the wire, with real peers."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
from sip_peers import band_db, dominant_hz, run, running_gateway, tone
from test_calls import RATE, legs, recorded, site

from tests.waiting import until

FRAME = 320  # engine samples per tick at 16 kHz / 20 ms


def test_dtmf_ptt_star_talks_hash_releases_and_dtmf_is_sent_back(phones, tmp_path):
    phone = phones("ptt", tone(600, 12))
    route = 'ptt = "dtmf"'
    seen: dict[str, int] = {}

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, None, route=route)) as gw:
            events: list[tuple[str, str, int]] = []
            gw.engine.listeners.append(lambda e: events.append((e.kind, e.port or "", e.tick)))
            phone.start(dial=f"sip:6001@127.0.0.1:{gw.sip.port}", seconds=9, verbose=True)
            leg = (await until(lambda: legs(gw), 5, "the call"))[0]
            await until(lambda: leg.stats()["packets_in"] > 50, 5, "a second of the phone's audio")
            assert ("talk_start", leg.name) not in [(k, p) for k, p, _ in events], "talked before *"
            phone.key("*")
            await until(
                lambda: ("talk_start", leg.name) in [(k, p) for k, p, _ in events],
                3,
                "* to key the phone's talk",
            )
            await until(lambda: gw.engine.tick_count > events[-1][2] + 75, 3, "1.5 s of talk")
            phone.key("#")
            await until(
                lambda: ("talk_stop", leg.name) in [(k, p) for k, p, _ in events], 3, "# to release"
            )
            for kind in ("talk_start", "talk_stop"):
                seen[kind] = next(t for k, p, t in events if (k, p) == (kind, leg.name))
            leg.send_dtmf("5")  # RFC 4733 the other way: the phone must report the key
            await until(lambda: "received event: '5' (end=1)" in phone.output(), 3, "phone gets 5")
            await until(lambda: gw.engine.tick_count > seen["talk_stop"] + 50, 3, "1 s after #")

    run(scenario())
    start, stop = seen["talk_start"], seen["talk_stop"]
    talkgroup = recorded(tmp_path / "talkgroup")
    during = talkgroup[(start + 5) * FRAME : (stop - 2) * FRAME]
    before = talkgroup[max(0, start - 60) * FRAME : (start - 5) * FRAME]
    after = talkgroup[(stop + 5) * FRAME : (stop + 45) * FRAME]
    assert band_db(during, 16000, 600) > -25, "the phone's tone is not heard while * is held"
    assert band_db(before, 16000, 600) < -60, "the phone was heard before pressing *"
    assert band_db(after, 16000, 600) < -60, "the phone is still heard after #"


def test_dial_out_patch_reaches_a_phone_and_redials_when_dropped(phones, tmp_path):
    far = phones("duty", np.concatenate([np.zeros(RATE // 2), tone(700, 20)]))
    far.start(seconds=30)  # waits for the gateway's call, answers it automatically

    async def scenario() -> None:
        dial = f"""
[sip.dial_out.duty_officer]
talkgroup = "marine"
uri = "{far.uri}"
retry_min = "1s"
retry_max = "2s"
"""
        async with running_gateway(site(tmp_path, None, extra=dial)) as gw:
            dial_out = gw.sip.dial_outs["duty_officer"]
            leg = (await until(lambda: legs(gw), 8, "the dial-out call"))[0]
            await until(lambda: leg.stats()["packets_in"] > 150, 6, "3 s of the far end")
            far.stop()  # hangs up (BYE) and goes away
            await until(lambda: not legs(gw), 5, "the dropped call to end")
            far.start(seconds=30)
            await until(lambda: dial_out.connects >= 2, 10, "the gateway to redial")
            assert dial_out.attempts >= 2

    run(scenario())
    heard = far.heard(call=0)
    middle = heard[RATE : 2 * RATE]
    assert abs(dominant_hz(middle, RATE) - 1000) < 15, "the far end does not hear the radio"
    talkgroup = recorded(tmp_path / "talkgroup")
    assert band_db(talkgroup, 16000, 700) > -30, "the talkgroup does not hear the far end"


def test_registrar_restart_gateway_registers_again_by_itself(kamailio, phones, tmp_path):
    async def scenario() -> None:
        async with running_gateway(site(tmp_path, kamailio.port)) as gw:
            account = gw.sip.registrations["marine"]
            await asyncio.wait_for(account.registered.wait(), 5)
            first = account.registrations
            kamailio.stop()
            await until(lambda: not account.registered.is_set(), 15, "the outage to be noticed")
            kamailio.start()  # same port, empty location table
            await until(
                lambda: account.registrations > first and account.registered.is_set(),
                15,
                "registration after the restart",
            )
            # The restarted registrar knows us again: a call through it reaches the talkgroup.
            phone = phones("after", tone(600, 8), registrar_port=kamailio.port)
            phone.start(dial=f"sip:6001@127.0.0.1:{kamailio.port}", seconds=3)
            await until(lambda: legs(gw), 5, "a call through the restarted registrar")

    run(scenario())


def test_malformed_sip_and_rtp_are_dropped_and_counted_call_goes_on(phones, tmp_path):
    phone = phones("victim", np.concatenate([np.zeros(RATE // 2), tone(600, 12)]))
    junk_sip = [
        b"INVITE sip:6001@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;bra",  # truncated
        b"INVITE sip:6001@127.0.0.1 SIP/3.0\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\r\n",  # version
        b"INVITE sip:6001@127.0.0.1 SIP/2.0\r\n" + b"X-Pad: " + b"A" * 20000 + b"\r\n\r\n",
        bytes(range(256)) * 4,  # garbage
        b"INVITE sip:6001@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9\r\n\r\n",  # no Call-ID
        b"SIP/2.0 200 OK\r\nCall-ID: nobody\r\n\r\n",  # response to nothing, unparseable
    ]
    good_header = bytes([0x80, 0x00, 0x00, 0x01, 0, 0, 0, 160, 1, 2, 3, 4])
    junk_rtp = [
        good_header[:7],  # truncated header
        bytes([0x40]) + good_header[1:] + bytes(160),  # RTP version 1
        good_header + bytes(1600),  # huge
        bytes(range(200)),  # garbage (version 0)
        bytes([0xA0]) + good_header[1:] + bytes([0, 0, 0, 200]),  # padding longer than payload
        bytes([0x80, 0x63]) + good_header[2:] + bytes(160),  # payload type nobody agreed
    ]

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, None)) as gw:
            phone.start(dial=f"sip:6001@127.0.0.1:{gw.sip.port}", seconds=7)
            leg = (await until(lambda: legs(gw), 5, "the call"))[0]
            await until(lambda: leg.stats()["packets_in"] > 100, 5, "2 s of the call")
            bank = leg.bank
            rtp_port = bank.port  # every call's media shares the gateway's one RTP port
            before_sip = gw.sip.transport.stats.malformed
            before_rtp = dict(bank.table.malformed)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for packet in junk_sip:
                    s.sendto(packet, ("127.0.0.1", gw.sip.port))
                for packet in junk_rtp:
                    s.sendto(packet, ("127.0.0.1", rtp_port))

            def rtp_counted() -> dict[str, int]:
                return {
                    k: v - before_rtp[k]
                    for k, v in bank.table.malformed.items()
                    if v > before_rtp[k]
                }

            await until(
                lambda: sum(rtp_counted().values()) >= len(junk_rtp),
                3,
                "every bad RTP packet to be counted",
            )
            await until(
                lambda: gw.sip.transport.stats.malformed - before_sip >= len(junk_sip),
                3,
                "every bad SIP message to be counted",
            )
            # Counted by kind. What is not even RTP-shaped is named for its shape; the rest
            # (a payload type nobody agreed, padding past the end) comes from an address
            # that is no call's peer and is dropped as such, unparsed. None of it is the
            # caller's fault.
            assert rtp_counted() == {"truncated": 1, "version": 2, "huge": 1, "source": 2}, (
                rtp_counted()
            )
            assert leg.stats()["packets_malformed"] == 0
            assert len(legs(gw)) == 1, "junk must not start or end calls"
            flowing = leg.stats()["packets_in"]
            await until(lambda: leg.stats()["packets_in"] > flowing + 50, 3, "audio after junk")
            await until(lambda: not phone.running(), 10, "the phone to finish")

    run(scenario())
    heard = phone.heard()
    tail = heard[-2 * RATE : -RATE // 2]
    assert abs(dominant_hz(tail, RATE) - 1000) < 15, "the phone stopped hearing the radio"
    talkgroup = recorded(tmp_path / "talkgroup")
    assert band_db(talkgroup[-3 * 16000 :], 16000, 600) > -30, "the talkgroup stopped hearing"


def test_single_floor_busy_tone_and_bye_to_the_phone_on_shutdown(phones, tmp_path):
    """The radio holds the floor; a phone that talks hears busy (480+620 Hz), not the radio.
    When the gateway stops, it sends BYE and the phone's call ends."""
    phone = phones("late", np.concatenate([np.zeros(RATE // 2), tone(800, 20)]))
    single = site(tmp_path, None).replace(
        'members = ["radio1", "rec"]', 'members = ["radio1", "rec"]\nfloor = "single"'
    )

    async def scenario() -> None:
        async with running_gateway(single) as gw:
            phone.start(dial=f"sip:6001@127.0.0.1:{gw.sip.port}", seconds=20)
            leg = (await until(lambda: legs(gw), 5, "the call"))[0]
            await until(lambda: gw.engine.denied[gw.engine.ports.index(leg)], 5, "floor denial")
            await until(lambda: leg.stats()["packets_out"] > 150, 5, "3 s of what the phone hears")
        # The gateway has stopped: its BYE ends the phone's call (libre reports a BYE
        # received as "Connection reset by peer") while the phone itself keeps running.
        await until(lambda: "Connection reset by peer" in phone.output(), 5, "the phone's BYE")
        assert phone.running()
        phone.stop()  # its recording is complete once it exits

    run(scenario())
    heard = phone.heard()[RATE:]
    assert band_db(heard, RATE, 480, 20) > -35 and band_db(heard, RATE, 620, 20) > -35, (
        "the phone does not hear a busy tone"
    )
    assert band_db(heard, RATE, 1000, 20) < band_db(heard, RATE, 480, 20) - 20, (
        "a denied phone must not hear the floor holder"
    )


def test_pin_gates_the_caller_and_a_reload_removing_the_talkgroup_hangs_up(phones, tmp_path):
    phone = phones("pin", tone(600, 15))
    toml = site(tmp_path, None, extra='pin = "12"')  # lands in [sip.routes."7001"]

    async def scenario() -> None:
        async with running_gateway(toml) as gw:
            talk: list[str] = []
            gw.engine.listeners.append(lambda e: talk.append(f"{e.kind} {e.port}"))
            phone.start(dial=f"sip:7001@127.0.0.1:{gw.sip.port}", seconds=15)
            leg = (await until(lambda: legs(gw), 5, "the call"))[0]
            await until(lambda: leg.stats()["packets_in"] > 50, 5, "a second of the caller")
            assert f"talk_start {leg.name}" not in talk, "heard before entering the PIN"
            phone.key("12#")
            await until(lambda: f"talk_start {leg.name}" in talk, 5, "the PIN to let VOX through")
            from gateway.config import parse_config

            # The talkgroup and the route to it go together (a route to a missing
            # talkgroup is refused by the config check).
            without = (
                toml.replace('[talkgroups.quiet]\nmembers = ["rec2"]\n', "")
                .replace('[sip.routes."7001"]\ntalkgroup = "quiet"\npublic = true\n', "")
                .replace('pin = "12"', "")
            )
            assert gw.apply(parse_config(without)).ok
            await until(lambda: not legs(gw), 5, "the call on a removed talkgroup to end")
            await until(lambda: "Connection reset by peer" in phone.output(), 5, "BYE at the phone")

    run(scenario())
