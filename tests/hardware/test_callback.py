"""The C stream callback (``_callback.c``), called here exactly as PortAudio calls it.

What the cards' real streams do with it is tested end to end on JACK (test_radio_*);
here are the cases a real stream seldom shows: rings wrapping every few periods,
lanes on other channels, underruns, skips, and the call's time stamp.
"""

from __future__ import annotations

import time

import numpy as np
from gateway.hardware.card_process import (
    COUNTERS,
    FRAMES,
    RX_DROPPED,
    TOTAL,
    TX_UNDERRUNS,
    XRUNS,
    Lane,
    StreamCallback,
    stamp,
)
from gateway.hardware.ring import SharedRing

CHANNELS = 3
PERIOD = 37  # odd, so the rings wrap at a different place each period


def ring(capacity: int) -> SharedRing:
    return SharedRing(memoryview(bytearray(SharedRing.nbytes(capacity))), capacity)


class TwoLanes:
    """A 3-channel stream: lane 0 records channel 2 and plays on 0, lane 1 the other way."""

    def __init__(self, capacity: int = 100) -> None:
        self.status = np.zeros(COUNTERS, np.int64)
        self.clock = np.zeros(1, np.float64)
        self.rx = [ring(capacity), ring(capacity)]
        self.tx = [ring(capacity), ring(capacity)]
        self.lane_status = [np.zeros(COUNTERS, np.int64) for _ in range(2)]
        lanes = [
            Lane.between(self.rx[0], self.tx[0], self.lane_status[0], 2, 0),
            Lane.between(self.rx[1], self.tx[1], self.lane_status[1], 0, 2),
        ]
        self.callback = StreamCallback(self.status, self.clock, CHANNELS, CHANNELS, lanes)
        self.out = np.full((PERIOD, CHANNELS), 9.0, np.float32)  # garbage the callback must clear

    def run(self, indata: np.ndarray, status_flags: int = 0) -> np.ndarray:
        self.out.fill(9.0)
        self.callback(np.ascontiguousarray(indata, np.float32), self.out, status_flags)
        return self.out.copy()


def test_each_lane_carries_its_own_channel_across_the_ring_wrap():
    s = TwoLanes()
    ramp = np.arange(40 * PERIOD, dtype=np.float32)
    captured: list[list[np.ndarray]] = [[], []]
    played: list[list[np.ndarray]] = [[], []]
    for k in range(40):
        chunk = ramp[k * PERIOD : (k + 1) * PERIOD]
        s.tx[0].push(chunk + 0.5)  # what each lane should play, one period ahead of need
        s.tx[1].push(-chunk)
        indata = np.stack([chunk * 10, np.full(PERIOD, 7.0), chunk * 100], axis=1)
        out = s.run(indata)
        assert np.all(out[:, 1] == 0.0), "a channel no lane plays is silent"
        played[0].append(out[:, 0])
        played[1].append(out[:, 2])
        for lane in range(2):
            captured[lane].append(s.rx[lane].pop_all())
    assert np.array_equal(np.concatenate(captured[0]), ramp * 100)  # lane 0 records channel 2
    assert np.array_equal(np.concatenate(captured[1]), ramp * 10)  # lane 1 records channel 0
    assert np.array_equal(np.concatenate(played[0]), ramp + 0.5)
    assert np.array_equal(np.concatenate(played[1]), -ramp)
    assert s.status[TOTAL] == 40 * PERIOD and s.status[FRAMES] == PERIOD
    assert s.status[XRUNS] == 0
    assert all(ls[TX_UNDERRUNS] == 0 and ls[RX_DROPPED] == 0 for ls in s.lane_status)


def test_the_stream_counts_xruns_and_stamps_each_call_with_the_monotonic_clock():
    s = TwoLanes()
    before = time.monotonic()
    s.run(np.zeros((PERIOD, CHANNELS)), status_flags=0x4)  # paOutputUnderflow
    s.run(np.zeros((PERIOD, CHANNELS)), status_flags=0)
    assert s.status[XRUNS] == 1
    assert before <= s.clock[0] <= time.monotonic()


def test_an_underrun_is_counted_once_per_run_dry_and_plays_what_there_was_then_silence():
    s = TwoLanes()
    silence = np.zeros((PERIOD, CHANNELS))
    s.tx[0].push(np.ones(PERIOD + 10, np.float32))
    s.run(silence)  # a whole period: serving
    out = s.run(silence)  # 10 samples, then dry
    assert np.all(out[:10, 0] == 1.0) and np.all(out[10:, 0] == 0.0)
    for _ in range(5):  # still dry: not counted again
        s.run(silence)
    assert s.lane_status[0][TX_UNDERRUNS] == 1
    assert s.lane_status[1][TX_UNDERRUNS] == 0, "lane 1 never played, so it never ran dry"
    s.tx[0].push(np.ones(2 * PERIOD, np.float32))
    s.run(silence)
    s.run(silence)
    s.run(silence)  # played two whole periods, then dry again
    assert s.lane_status[0][TX_UNDERRUNS] == 2


def test_a_full_capture_ring_counts_what_it_dropped():
    s = TwoLanes(capacity=100)
    for _ in range(3):  # 111 samples into a ring of 100 that nobody reads
        s.run(np.ones((PERIOD, CHANNELS)))
    assert s.lane_status[0][RX_DROPPED] == 3 * PERIOD - 100
    assert s.rx[0].level == 100


def test_a_skip_the_writer_asked_for_is_done_before_playing():
    s = TwoLanes()
    s.tx[0].push(np.arange(90, dtype=np.float32))
    s.tx[0].ask_skip(50)
    out = s.run(np.zeros((PERIOD, CHANNELS)))
    assert np.array_equal(out[:, 0], np.arange(50, 50 + PERIOD, dtype=np.float32))


def test_each_call_stamps_its_first_frame_with_the_time():
    s = TwoLanes()
    times = []
    for _ in range(3):
        times.append(time.monotonic())
        s.run(np.zeros((PERIOD, CHANNELS)))
    frame, when = stamp(s.status, s.clock)
    assert frame == 2 * PERIOD, "the third call began at frame 2·PERIOD"
    assert times[2] <= when <= time.monotonic()
