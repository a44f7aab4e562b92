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
from sip_peers import band_db, dominant_hz, run, tone, until
from test_calls import RATE, legs, recorded, site

from gateway.app import Gateway
from gateway.config import load_config

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


def test_sighup_adds_and_removes_routes_and_a_call_on_a_kept_route_keeps_its_audio(
    phones, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    path = tmp_path / "site.toml"
    before = site(tmp_path, None)
    # 6001 only gets a new VOX threshold (its calls stay, on their old terms); 7001 goes;
    # 8001 comes.
    after = before.replace(
        '[sip.routes."6001"]\ntalkgroup = "marine"\n',
        '[sip.routes."6001"]\ntalkgroup = "marine"\nvox_threshold_dbfs = -45\n',
    )
    after = after.replace('[sip.routes."7001"]\ntalkgroup = "quiet"\n', "")
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
            assert line == "config applied: sip: routes +8001 -7001 ~6001"
            await until(
                lambda: "Connection reset by peer" in gone.output(), 5, "BYE to 7001's call"
            )
            assert legs(gw) == [kept_leg], "the call on the kept route must be the same leg"
            new.start(dial=f"sip:8001@127.0.0.1:{port}", seconds=4)
            stale.start(dial=f"sip:7001@127.0.0.1:{port}", seconds=4)
            await until(lambda: len(legs(gw)) == 2, 10, "the new number to answer")
            assert any("8001" in lg.name for lg in legs(gw))
            await until(lambda: "404 Not Found" in stale.output(), 10, "7001 to be refused")
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
    talkgroup = recorded(tmp_path / "talkgroup.wav")
    tick = timeline["tick"]
    for when, first, last in (("before", tick - 75, tick - 5), ("after", tick + 5, tick + 150)):
        window = talkgroup[first * FRAME : last * FRAME]
        assert band_db(window, 16000, 600) > -30, f"the talkgroup did not hear the call {when}"
