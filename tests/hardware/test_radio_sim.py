"""The radio simulator keeps its signal on the stream's frame count even when starved.

Tests use the frame a signal starts at as time (a delay is "heard at frame F, sent at
frame S"). When the simulator's feeder thread is starved past its lead, its playback
ring runs dry and the stream plays silence; the signal due then is lost, but what
follows must still play at its own frame, or every later delay the test measures is
off by the stall (a 454 ms "radio→radio delay" was once this, not the gateway).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.hardware.jackradio import LEAST_WAIT_S, RATE, delay_of
from tests.waiting import wait_for

pytestmark = pytest.mark.jack


def test_a_starved_feeder_loses_frames_but_not_its_place(radio_sim):
    sim = radio_sim(1, seconds=6.0)
    sim.loop_back(0)  # its speaker into its own mic: what it plays comes back a period later
    noise = (np.random.default_rng(7).standard_normal(2 * RATE) * 0.1).astype(np.float32)
    start = sim.start(0, noise)
    wait_for(lambda: sim.frame > start + RATE // 2, LEAST_WAIT_S, "half a second played")
    before = sim.underruns
    sim.stall(0.15)  # far past the feeder's 32 ms lead: the ring runs dry
    wait_for(lambda: sim.frame > start + len(noise) + RATE // 4, LEAST_WAIT_S, "the signal's end")
    assert sim.underruns > before, "the stall did not run the playback ring dry"
    heard = sim.recorded(0, since=start)
    head, _ = delay_of(noise[: RATE // 4], heard[: RATE // 2])
    tail_from = int(1.25 * RATE)  # well after the stall (it began about 0.5 s in)
    tail, sharp = delay_of(noise[tail_from : tail_from + RATE // 4], heard[tail_from:])
    assert sharp > 0.5, f"the tail of the signal is not there (correlation {sharp:.2f})"
    assert abs(tail - head) <= sim.blocksize, (
        f"the signal after the stall moved {(tail - head) / RATE * 1000:.1f} ms against the "
        "frame count"
    )
