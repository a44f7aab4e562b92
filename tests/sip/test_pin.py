"""PIN routes with a real phone keying DTMF: nothing heard either way before the exact PIN
and '#', wrong entries audited and backed off, three wrong or a timeout end the call."""

from __future__ import annotations

import json
from pathlib import Path

from sip_peers import band_db, run, running_gateway, tone
from test_auth import Uac, status
from test_calls import RATE, legs, recorded, site

from tests.waiting import until

FRAME = 320  # engine samples per tick (16 kHz, 20 ms)
CODEC_FRAME = 160  # what the phone gets per packet (8 kHz, 20 ms)


def pin_site(tmp: Path, extra: str = "") -> str:
    audit = f'\n[audit]\npath = "{tmp / "audit.jsonl"}"\nsync_every = "0s"\n'
    return site(tmp, None, route=f'public = true\npin = "4321"\n{extra}') + audit


def audit_lines(tmp: Path, event: str) -> list[dict]:
    path = tmp / "audit.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line["event"] == event]


def test_nothing_heard_either_way_until_the_exact_pin_then_both_ways(phones, tmp_path):
    phone = phones("pinned", tone(600, 30))
    marks: dict[str, int] = {}

    async def scenario() -> None:
        async with running_gateway(pin_site(tmp_path)) as gw:
            talk: list[str] = []
            gw.engine.listeners.append(lambda e: talk.append(f"{e.kind} {e.port}"))
            phone.start(dial=f"sip:6001@127.0.0.1:{gw.sip.port}", seconds=30)
            leg = (await until(lambda: legs(gw), 5, "the call"))[0]
            await until(lambda: leg.stats()["packets_out"] > 150, 6, "3 s of the call")
            marks["wrong"] = leg.stats()["packets_out"]
            # A longer number that ends in the PIN is not the PIN.
            phone.key("94321#")
            await until(lambda: audit_lines(tmp_path, "sip_pin_failed"), 5, "the wrong PIN")
            assert f"talk_start {leg.name}" not in talk, "the caller was heard before its PIN"
            assert leg.bank.table.muted[leg.row]
            await until(lambda: leg.stats()["packets_out"] > marks["wrong"] + 50, 3, "1 s more")
            phone.key("4321#")
            await until(
                lambda: not leg.bank.table.muted[leg.row], 5, "the right PIN to open the call"
            )
            marks["open"] = leg.stats()["packets_out"]
            marks["tick"] = gw.engine.tick_count
            await until(lambda: f"talk_start {leg.name}" in talk, 5, "the caller to be heard")
            await until(lambda: leg.stats()["packets_out"] > marks["open"] + 150, 5, "3 s open")
            phone.stop()  # its recording is complete once it exits
            assert len(audit_lines(tmp_path, "sip_pin_failed")) == 1
            accepted = audit_lines(tmp_path, "sip_pin_accepted")
            assert [a["port"] for a in accepted] == [leg.name]
            call = audit_lines(tmp_path, "sip_call")[0]
            assert call["port"] == leg.name and call["source"] == "127.0.0.1"
            assert call["auth"] == "public" and "caller" not in call  # nobody proved a name

    run(scenario())
    heard = phone.heard()
    # Before the PIN (a half-second margin for the phone's own buffering): no radio.
    before = heard[: (marks["open"] - 25) * CODEC_FRAME]
    after = heard[(marks["open"] + 25) * CODEC_FRAME : (marks["open"] + 125) * CODEC_FRAME]
    assert len(before) > 3 * RATE and len(after) > RATE
    assert band_db(before, RATE, 1000) < -60, "the caller heard the talkgroup before its PIN"
    assert band_db(after, RATE, 1000) > -20, "the caller does not hear the talkgroup after it"
    talkgroup = recorded(tmp_path / "talkgroup")
    tick = marks["tick"]
    assert band_db(talkgroup[: (tick - 25) * FRAME], 16000, 600) < -60, "heard before the PIN"
    assert band_db(talkgroup[(tick + 25) * FRAME :], 16000, 600) > -30, "not heard after it"


def test_three_wrong_pins_end_the_call_and_back_the_address_off(phones, tmp_path):
    phone = phones("guesser", tone(600, 30))

    async def scenario() -> None:
        async with running_gateway(pin_site(tmp_path)) as gw:
            phone.start(dial=f"sip:6001@127.0.0.1:{gw.sip.port}", seconds=30)
            leg = (await until(lambda: legs(gw), 5, "the call"))[0]
            await until(lambda: leg.stats()["packets_in"] > 50, 5, "the call's audio")
            for n, guess in enumerate(("1111#", "4322#", "43210#"), 1):
                phone.key(guess)
                await until(
                    lambda n=n: len(audit_lines(tmp_path, "sip_pin_failed")) == n, 5, f"try {n}"
                )
            await until(lambda: not legs(gw), 5, "the call to be ended")
            await until(lambda: "Connection reset by peer" in phone.output(), 5, "BYE at the phone")
            failed = audit_lines(tmp_path, "sip_pin_failed")
            assert [f["tries"] for f in failed] == [1, 2, 3]
            assert [f.get("hangup") for f in failed] == [False, False, True]
            assert all(f["source"] == "127.0.0.1" and f["port"] == leg.name for f in failed)
            # The address is backed off: its next INVITE is refused at once.
            uac = Uac("127.0.0.1")
            call_id, _ = uac.invite(gw.sip.port, "6001")
            assert status(await uac.final(call_id)) == 503
            uac.close()

    run(scenario())


def test_no_pin_in_time_ends_the_call(phones, tmp_path):
    phone = phones("silent", tone(600, 30))

    async def scenario() -> None:
        async with running_gateway(pin_site(tmp_path, 'pin_timeout = "2s"')) as gw:
            phone.start(dial=f"sip:6001@127.0.0.1:{gw.sip.port}", seconds=30)
            leg = (await until(lambda: legs(gw), 5, "the call"))[0]
            phone.key("43")  # started, never finished
            await until(lambda: not legs(gw), 8, "the call to time out")
            await until(lambda: "Connection reset by peer" in phone.output(), 5, "BYE at the phone")
            timeouts = audit_lines(tmp_path, "sip_pin_timeout")
            assert [t["port"] for t in timeouts] == [leg.name]
            assert not audit_lines(tmp_path, "sip_pin_accepted")

    run(scenario())
    phone.stop()  # baresip closes its recording on the way out
    heard = phone.heard()
    assert len(heard) > RATE, "the phone recorded less than a second of the call"
    assert band_db(heard, RATE, 1000) < -60, "the caller heard the talkgroup"
