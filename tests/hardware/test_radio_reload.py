"""A live reload opens and closes sound cards off the tick: an over in progress goes on.

Opening a card means starting its process and PortAudio (about 0.2 s), closing one
waiting for its process to end. Done on the event loop, that stalls the tick, and
every radio, call and console with it: radio B's transmitter would carry a gap.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from tests.hardware.gwrun import build, drive
from tests.hardware.jackradio import LEAST_WAIT_S, RATE, card_client, site_toml, tone
from tests.hardware.test_radio_path import onset, radio
from tests.waiting import wait_for

pytestmark = pytest.mark.jack


def longest_gap(x: np.ndarray, threshold_db: float = -40.0, step: int = RATE // 100) -> float:
    """Seconds of the longest run of 10 ms blocks below ``threshold_db``."""
    blocks = x[: len(x) - len(x) % step].reshape(-1, step)
    quiet = (
        20
        * np.log10(np.maximum(np.sqrt(np.mean(np.square(blocks, dtype=np.float64), axis=1)), 1e-9))
        < threshold_db
    )
    longest = run = 0
    for q in quiet:
        run = run + 1 if q else 0
        longest = max(longest, run)
    return longest * step / RATE


def run_delay(thread_id: int) -> float:
    """Seconds the thread has spent runnable but waiting for a CPU (the kernel's schedstat):
    what a starved machine costs it, as against time it spent running or blocked."""
    with open(f"/proc/self/task/{thread_id}/schedstat") as stat:
        return int(stat.read().split()[1]) / 1e9


def test_a_live_reload_adding_and_removing_radios_leaves_no_gap_in_an_over(
    jack_server, radio_sim, tmp_path
):
    gw = build(tmp_path, site_toml({"radio_a": radio(), "radio_b": radio(), "radio_old": radio()}))
    sim = radio_sim(2)
    sim.connect(0, card_client("radio_a"))
    sim.connect(1, card_client("radio_b"))
    over = tone(1000, 4.0, -12)
    loop: dict = {}

    def scenario():
        wait_for(lambda: gw.engine.tick_count > 25, LEAST_WAIT_S, "the gateway to tick")
        starved = run_delay(loop["thread"])
        start = sim.start(0, over)
        wait_for(lambda: sim.frame > start + RATE, LEAST_WAIT_S, "a second of the over")
        # radio_old goes, radio_new comes: one card process closed, one started
        text = (tmp_path / "site.toml").read_text().replace("radio_old", "radio_new")
        (tmp_path / "site.toml").write_text(text)
        began = time.monotonic()
        result = asyncio.run_coroutine_threadsafe(gw.reload_live(), loop["loop"]).result(20)
        reload_seconds = time.monotonic() - began
        assert result.ok and result.added == ["radio_new"] and result.removed == ["radio_old"]
        wait_for(lambda: sim.frame > start + len(over) + RATE // 2, LEAST_WAIT_S, "the over to end")
        starved = run_delay(loop["thread"]) - starved
        return start, gw.ports["radio_new"].card.up, reload_seconds, starved

    original = gw.run

    async def run(seconds=None, watch=False):
        loop["loop"] = asyncio.get_running_loop()
        loop["thread"] = threading.get_native_id()
        await original(seconds, watch)

    gw.run = run
    start, new_card_up, reload_seconds, starved = drive(gw, scenario)
    assert new_card_up, "radio_new's card opened"
    heard = sim.recorded(1, since=start)
    first = onset(heard)
    assert first is not None, "B never carried the over"
    # The over as B carried it, less the ends (squelch attack, hang): no gap within.
    body = heard[first + RATE // 10 : first + len(over) - RATE // 10]
    # Done on the loop, the reload's card work would silence B for about as long as the
    # reload took (0.2 s idle, longer on a loaded machine); a loaded machine alone stalls
    # the tick for tens of ms. So the bound scales with what the reload took, plus the time
    # the loop's thread waited for a CPU during the over (a starved gateway is not a
    # blocked one: blocked, the thread is running or asleep, not waiting to run).
    gap = longest_gap(body)
    assert gap < max(0.1, reload_seconds / 2) + starved, (
        f"a {gap * 1000:.0f} ms gap in B's over (the reload took {reload_seconds * 1000:.0f} ms,"
        f" the gateway's loop waited {starved * 1000:.0f} ms for a CPU)"
    )
