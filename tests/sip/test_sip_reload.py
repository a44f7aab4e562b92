"""A reload (SIGHUP, ``run --watch``) applies ``[sip]`` live, with real phones and registrar.

New routes answer and removed ones end their calls with BYE; a call on a route the
reload leaves alone keeps its leg and its audio both ways (checked by frequency
across the reload); accounts register and unregister; what cannot move live (the
listen address) is refused with "restart". The reload's log line names each change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from sip_peers import band_db, dominant_hz, run, tone
from test_calls import RATE, legs, recorded, site

from gateway.app import Gateway
from gateway.config import load_config
from tests.waiting import until

# A route for the new configs below: open to anyone, as a test route may be.
NEW_ROUTE = """
[sip.routes."{number}"]
talkgroup = "{talkgroup}"
public = true
"""


@contextlib.asynccontextmanager
async def running_site(path: Path, toml: str) -> AsyncIterator[Gateway]:
    """The real Gateway run from a file, as ``borderlink run FILE`` does (SIGHUP re-reads it)."""
    path.write_text(toml)
    gateway = Gateway(load_config(path))
    task = asyncio.ensure_future(gateway.run())
    try:
        await until(lambda: task.done() or getattr(gateway.sip, "calls", None), 5, "SIP to start")
        if task.done():
            task.result()
        yield gateway
    finally:
        gateway.stop()
        await asyncio.wait_for(task, 10)


async def sighup(path: Path, toml: str, caplog) -> str:
    """Write the new file, send the gateway SIGHUP, and return its reload log line."""
    caplog.clear()
    path.write_text(toml)
    os.kill(os.getpid(), signal.SIGHUP)

    def line() -> str:
        done = [r.getMessage() for r in caplog.records if r.name == "gateway.app"]
        return next((m for m in done if m.startswith(("config applied", "reload refused"))), "")

    return await until(line, 10, "the reload's log line")


FRAME = 320  # talkgroup recorder samples per tick (16 kHz, 20 ms)


def without_table(toml: str, header: str) -> str:
    """``toml`` without the table ``header`` and its keys (up to the next table)."""
    start = toml.index(header)
    end = toml.find("\n[", start)
    return toml[:start] + (toml[end + 1 :] if end >= 0 else "")


def test_sighup_adds_and_removes_routes_and_a_call_on_a_kept_route_keeps_its_audio(
    phones, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    path = tmp_path / "site.toml"
    before = site(tmp_path, None)
    # 6001 stays as it is; 7001 goes; 8001 comes.
    after = without_table(before, '[sip.routes."7001"]')
    after += NEW_ROUTE.format(number="8001", talkgroup="quiet")
    assert after.count("[sip.routes.") == 2
    kept = phones("kept", np.concatenate([np.zeros(RATE // 2), tone(600, 14)]))
    gone = phones("gone", tone(900, 14))
    new = phones("new", tone(700, 8))
    stale = phones("stale", tone(700, 8))
    timeline: dict[str, int] = {}

    async def scenario() -> None:
        async with running_site(path, before) as gw:
            port = gw.sip.port
            kept.start(dial=f"sip:6001@127.0.0.1:{port}", seconds=12)
            gone.start(dial=f"sip:7001@127.0.0.1:{port}", seconds=12)
            await until(lambda: len(legs(gw)) == 2, 10, "both calls")
            kept_leg = next(lg for lg in legs(gw) if "6001" in lg.name)
            await until(lambda: kept_leg.stats()["packets_out"] > 150, 5, "3 s of the call")
            timeline["packets"] = int(kept_leg.stats()["packets_out"])
            timeline["tick"] = gw.engine.tick_count
            line = await sighup(path, after, caplog)
            print(line)
            assert line == "config applied: sip: routes +8001 -7001"
            await until(
                lambda: "Connection reset by peer" in gone.output(), 5, "BYE to 7001's call"
            )
            assert legs(gw) == [kept_leg], "the call on the kept route must be the same leg"
            new.start(dial=f"sip:8001@127.0.0.1:{port}", seconds=4)
            stale.start(dial=f"sip:7001@127.0.0.1:{port}", seconds=4)
            await until(lambda: len(legs(gw)) == 2, 10, "the new number to answer")
            assert any("8001" in lg.name for lg in legs(gw))
            await until(lambda: "404 Not Found" in stale.output(), 30, "7001 to be refused")
            await until(lambda: gw.engine.tick_count > timeline["tick"] + 200, 10, "4 s more")
            assert kept_leg in legs(gw), "the call on the kept route was dropped"
            await until(lambda: not kept.running(), 15, "the kept call to run its course")

    run(scenario())
    # Both ways, across the reload: the kept phone heard the radio all along...
    heard = kept.heard()
    reload_at = timeline["packets"] * 160  # phone samples (8 kHz, 20 ms packets)
    assert len(heard) > reload_at + 3 * RATE, "the kept call ended too soon after the reload"
    for start in range(RATE // 2, len(heard) - RATE // 2, RATE // 4):
        chunk = heard[start : start + RATE // 4]
        assert abs(dominant_hz(chunk, RATE) - 1000) < 20, f"radio not heard at {start / RATE}s"
        assert band_db(chunk, RATE, 1000) > -25, f"radio faded at {start / RATE}s"
    # ...and the talkgroup heard the kept phone after the reload as before it.
    talkgroup = recorded(tmp_path / "talkgroup")
    tick = timeline["tick"]
    for when, first, last in (("before", tick - 75, tick - 5), ("after", tick + 5, tick + 150)):
        window = talkgroup[first * FRAME : last * FRAME]
        assert band_db(window, 16000, 600) > -30, f"the talkgroup did not hear the call {when}"


def test_reload_registers_a_new_account_reregisters_a_changed_one_unregisters_a_removed_one(
    kamailio, phones, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    path = tmp_path / "site.toml"
    before = site(tmp_path, kamailio.port)
    land = f"""
[sip.accounts.land]
registrar = "127.0.0.1:{kamailio.port}"
username = "6002"
password = "s3cret"
""" + NEW_ROUTE.format(number="6002", talkgroup="marine")
    more = before.replace('expires = "60s"', 'expires = "120s"') + land
    fewer = more.replace(more[more.index("[sip.accounts.marine]") :].split("\n\n")[0], "")
    assert "[sip.accounts.marine]" not in fewer and "[sip.accounts.land]" in fewer
    via_land = phones("vialand", tone(600, 6), registrar_port=kamailio.port)
    via_marine = phones("viamarine", tone(600, 6), registrar_port=kamailio.port)

    async def scenario() -> None:
        async with running_site(path, before) as gw:
            marine = gw.sip.registrations["marine"]
            await asyncio.wait_for(marine.registered.wait(), 5)
            line = await sighup(path, more, caplog)
            assert line == "config applied: sip: accounts +land ~marine, routes +6002", line
            land, remarine = gw.sip.registrations["land"], gw.sip.registrations["marine"]
            assert remarine is not marine and remarine.account.expires == 120
            await asyncio.wait_for(land.registered.wait(), 10)
            await asyncio.wait_for(remarine.registered.wait(), 10)
            via_land.start(dial=f"sip:6002@127.0.0.1:{kamailio.port}", seconds=3)
            await until(lambda: legs(gw), 5, "a call to the new account's number")
            await until(lambda: not legs(gw), 10, "that call to end")

            line = await sighup(path, fewer, caplog)
            assert line == "config applied: sip: accounts -marine", line
            assert "marine" not in gw.sip.registrations
            await until(lambda: not remarine.registered.is_set(), 10, "marine to unregister")
            via_marine.start(dial=f"sip:6001@127.0.0.1:{kamailio.port}", seconds=3)
            await until(
                lambda: "404 Not Found" in via_marine.output(), 10, "the registrar to forget 6001"
            )
            assert land.registered.is_set() and not legs(gw)

    run(scenario())


def test_reload_refuses_a_new_listen_address_ends_calls_whose_route_changed_and_sip_removed(
    phones, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    path = tmp_path / "site.toml"
    before = site(tmp_path, None)
    moved = before.replace('listen = "127.0.0.1:', 'listen = "127.0.0.2:')
    # 6001 moves to another talkgroup (its call ends); 7001 only gets a new VOX threshold
    # (its call carries on, on the terms it was answered with).
    retargeted = before.replace(
        '[sip.routes."6001"]\ntalkgroup = "marine"', '[sip.routes."6001"]\ntalkgroup = "quiet"'
    ).replace(
        '[sip.routes."7001"]\ntalkgroup = "quiet"\n',
        '[sip.routes."7001"]\ntalkgroup = "quiet"\nvox_threshold_dbfs = -45\n',
    )
    no_sip = retargeted.split("[sip]\n")[0]  # [sip] and its tables come last in site()
    assert "[sip" not in no_sip
    first = phones("first", tone(600, 14))
    second = phones("second", tone(900, 14))
    late = phones("late", tone(700, 6))

    async def scenario() -> None:
        async with running_site(path, before) as gw:
            port = gw.sip.port
            first.start(dial=f"sip:6001@127.0.0.1:{port}", seconds=12)
            second.start(dial=f"sip:7001@127.0.0.1:{port}", seconds=12)
            await until(lambda: len(legs(gw)) == 2, 10, "both calls")

            def by_route() -> list:  # 6001's call, then 7001's (whichever was answered first)
                return sorted(legs(gw), key=lambda leg: "7001" in leg.name)

            calls = by_route()

            path.write_text(moved)
            result = await gw.reload_live()
            assert not result.ok and "[sip] listen changed" in result.error, result.error
            assert "restart the gateway" in result.error
            assert by_route() == calls and gw.sip.config.listen.endswith(f":{port}")

            path.write_text(retargeted)
            result = await gw.reload_live()
            assert result.ok and result.summary == "sip: routes ~6001 ~7001", result.summary
            await until(lambda: "Connection reset by peer" in first.output(), 5, "BYE to 6001")
            assert legs(gw) == [calls[1]], "7001's call must stay"

            path.write_text(no_sip)
            result = await gw.reload_live()
            assert result.ok and result.summary == "sip: removed", result.summary
            await until(lambda: "Connection reset by peer" in second.output(), 30, "BYE to 7001")
            late.start(dial=f"sip:7001@127.0.0.1:{port}", seconds=4)
            await until(lambda: "404 Not Found" in late.output(), 30, "7001 to be refused")
            assert not legs(gw)

    run(scenario())


def test_reload_adding_sip_to_a_gateway_started_without_it_is_refused(tmp_path, caplog):
    path = tmp_path / "site.toml"
    with_sip = site(tmp_path, None)
    without = with_sip.split("[sip]\n")[0]

    async def scenario() -> None:
        path.write_text(without)
        gw = Gateway(load_config(path))
        task = asyncio.ensure_future(gw.run())
        try:
            await until(lambda: task.done() or gw.engine.tick_count > 5, 5, "the gateway")
            assert gw.sip is None
            path.write_text(with_sip)
            result = await gw.reload_live()
            assert not result.ok and "[sip] was added" in result.error, result.error
            assert "restart the gateway" in result.error and gw.config.section("sip") is None
        finally:
            gw.stop()
            await asyncio.wait_for(task, 10)

    run(scenario())


def test_reload_starts_restarts_and_stops_a_dial_out(phones, tmp_path):
    far = phones("duty", np.concatenate([np.zeros(RATE // 2), tone(700, 40)]))
    far.start(seconds=40)  # answers whatever the gateway places
    path = tmp_path / "site.toml"
    before = site(tmp_path, None)
    dial = f"""
[sip.dial_out.duty_officer]
talkgroup = "marine"
uri = "{far.uri}"
retry_min = "1s"
retry_max = "2s"
"""
    calls_at_far = lambda: far.output().count("Call established")  # noqa: E731

    async def scenario() -> None:
        async with running_site(path, before) as gw:
            path.write_text(before + dial)
            result = await gw.reload_live()
            assert result.summary == "sip: dial_out +duty_officer", result.summary
            first = (await until(lambda: legs(gw), 8, "the dial-out call"))[0]
            await until(lambda: first.stats()["packets_out"] > 150, 6, "3 s of the call")

            path.write_text(before + dial.replace('retry_max = "2s"', 'retry_max = "3s"'))
            result = await gw.reload_live()
            assert result.summary == "sip: dial_out ~duty_officer", result.summary
            dial_out = gw.sip.dial_outs["duty_officer"]
            await until(lambda: dial_out.connects == 1, 10, "the changed dial-out to call again")
            assert first not in legs(gw) and len(legs(gw)) == 1, "the old call must have ended"

            path.write_text(before)
            result = await gw.reload_live()
            assert result.summary == "sip: dial_out -duty_officer", result.summary
            await until(lambda: not legs(gw), 5, "the removed dial-out's call to end")
            tick = gw.engine.tick_count
            await until(lambda: gw.engine.tick_count > tick + 200, 10, "4 s")
            assert not legs(gw) and not gw.sip.dial_outs, "a removed dial-out redialled"

    run(scenario())
    assert calls_at_far() == 2, far.output()[-2000:]
    heard = far.heard(call=0)
    assert abs(dominant_hz(heard[RATE : 2 * RATE], RATE) - 1000) < 15, "far end heard no radio"
