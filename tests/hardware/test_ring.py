"""The lock-free ring between a card's process and the tick: order, room, skips, two processes."""

from __future__ import annotations

import mmap
import subprocess
import sys

import numpy as np
from gateway.hardware.card_process import RING_SAMPLES, CardBlock
from gateway.hardware.ring import SharedRing


def ring(capacity: int) -> SharedRing:
    return SharedRing(memoryview(bytearray(SharedRing.nbytes(capacity))), capacity)


def test_samples_come_out_in_order_across_the_wrap():
    r = ring(100)
    ramp = np.arange(1000, dtype=np.float32)
    out, got = np.zeros(37, np.float32), []
    for start in range(0, 1000, 30):  # 30 in, up to 37 out: the ends cross the wrap often
        assert r.push(ramp[start : start + 30]) == 0
        n = r.pop_into(out)
        got.append(out[:n].copy())
    got.append(r.pop_all())
    assert np.array_equal(np.concatenate(got), ramp)
    assert r.level == 0


def test_a_full_ring_keeps_the_oldest_and_says_how_many_it_could_not_take():
    r = ring(64)
    assert r.push(np.arange(50, dtype=np.float32)) == 0
    assert r.push(np.arange(50, 70, dtype=np.float32)) == 6
    assert r.level == 64
    assert np.array_equal(r.pop_all(), np.arange(64, dtype=np.float32))


def test_the_writer_asks_and_the_reader_skips_the_oldest():
    r = ring(64)
    r.push(np.arange(40, dtype=np.float32))
    r.ask_skip(10)
    assert r.queued == 30 and r.level == 40  # asked, not yet done
    out = np.zeros(5, np.float32)
    assert r.pop_into(out) == 5 and np.array_equal(out, np.arange(10, 15, dtype=np.float32))
    r.ask_skip(100)  # more than is there: only what is there goes
    assert r.pop_into(out) == 0 and r.level == 0
    r.push(np.ones(3, np.float32))
    assert np.array_equal(r.pop_all(), np.ones(3, np.float32)), "a skip outlived its samples"


WRITER = """
import sys, numpy as np
from gateway.hardware.card_process import CardBlock
block = CardBlock(sys.argv[1])
ramp = np.arange(int(sys.argv[2]), dtype=np.float32)
sent = 0
while sent < len(ramp):  # chunks of odd sizes, as fast as room allows
    sent += len(ramp[sent : sent + 257]) - block.rx.push(ramp[sent : sent + 257])
block.close()
"""


def test_a_writer_in_another_process_loses_and_repeats_nothing():
    """The real case: the card's process writes, the tick reads, at full speed, many laps."""
    block = CardBlock()
    total = RING_SAMPLES * 8 + 123  # float32 counts are exact up to 2**24
    writer = subprocess.Popen([sys.executable, "-c", WRITER, block.name, str(total)])
    try:
        got, have = np.zeros(total, np.float32), 0
        while have < total:
            chunk = block.rx.pop_all()
            got[have : have + len(chunk)] = chunk
            have += len(chunk)
            assert writer.poll() in (None, 0), "the writer failed"
        assert writer.wait(30) == 0
        assert np.array_equal(got, np.arange(total, dtype=np.float32))
    finally:
        if writer.poll() is None:
            writer.kill()
        block.close()


HAMMER = """
import mmap, sys, numpy as np
from gateway.hardware.ring import SharedRing
path, capacity, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "r+b") as f:
    memory = mmap.mmap(f.fileno(), 0)
ring = SharedRing(memoryview(memory), capacity)
sequence = np.arange(total, dtype=np.float32)
sent, size = 0, 1
while sent < total:  # every chunk size from 1 to 97, as fast as room allows
    chunk = sequence[sent : sent + size]
    sent += len(chunk) - ring.push(chunk)
    size = size % 97 + 1
"""


def test_two_processes_hammering_a_small_ring_see_every_sample_once_in_order(tmp_path):
    """A thousand laps of a ring a few chunks long, each sample its own sequence
    number: a reader that saw the written counter before the samples (the stores out of
    order, as arm64 may do without acquire/release) would find a stale sample, one lap
    old; a lost or repeated sample shows as a jump."""
    capacity, total = 1021, 1 << 20  # float32 counts exactly up to 2**24
    path = tmp_path / "ring"
    path.write_bytes(bytes(SharedRing.nbytes(capacity)))
    with open(path, "r+b") as f:
        memory = mmap.mmap(f.fileno(), 0)
    ring = SharedRing(memoryview(memory), capacity)
    writer = subprocess.Popen([sys.executable, "-c", HAMMER, str(path), str(capacity), str(total)])
    try:
        out, have, size = np.zeros(256, np.float32), 0, 1
        while have < total:
            n = ring.pop_into(out[:size])
            if n:
                expected = np.arange(have, have + n, dtype=np.float32)
                bad = np.flatnonzero(out[:n] != expected)
                assert not bad.size, f"sample {have + bad[0]} read as {out[bad[0]]}"
                have += n
            else:
                assert writer.poll() in (None, 0), "the writer failed"
            size = size % 256 + 1
        assert writer.wait(60) == 0
        assert ring.level == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        del ring
        memory.close()
