"""The elastic FIFOs' audio path in C (``_elastic.c``): what comes out of the resampler is
what the windowed-sinc formula says, however the audio is moved (from a ring, into a
ring, in chunks of any size at a ratio that changes every call), and the receive store
keeps order through take, cut and pad."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gateway.codecs.interp import _PHASES, kaiser_sinc, sinc_table
from gateway.hardware._elastic import STORE, Resampler
from gateway.hardware.elastic import _resampler
from gateway.hardware.ring import SharedRing

RATES = [(48000, 16000), (16000, 48000), (44100, 16000)]


def ring(capacity: int = 1 << 16) -> SharedRing:
    return SharedRing(memoryview(bytearray(SharedRing.nbytes(capacity))), capacity)


def design(in_rate: int, out_rate: int) -> tuple[float, int]:
    """The FIFOs' kernel (elastic.py): cutoff and half width in input samples."""
    band = min(1.0, out_rate / in_rate)
    return 0.75 * band, math.ceil(8 / band)


def by_formula(x: np.ndarray, pos: float, step: float, n: int, cutoff: float, half: int):
    """Output k at input position pos + k·step: the kernel at its exact fraction (no table),
    in float64. The table's 512 phases, blended, are within 1e-5 of it."""
    out = np.empty(n)
    for k in range(n):
        p = pos + k * step
        base = math.floor(p)
        kernel = kaiser_sinc(np.array([p - base]), cutoff, half, 7.0)[0]
        out[k] = np.dot(x[base - (half - 1) : base + half + 1], kernel)
    return out


class Formula:
    """The stream as the formula sees it: all input so far, after the silence the resampler
    starts with, and the position of the next output."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.cutoff, self.half = design(in_rate, out_rate)
        self.x = np.zeros(2 * self.half - 1, np.float32)
        self.pos = float(self.half - 1)

    def check(self, chunk: np.ndarray, y: np.ndarray, step: float) -> None:
        self.x = np.concatenate((self.x, chunk))
        want = by_formula(self.x, self.pos, step, len(y), self.cutoff, self.half)
        assert np.max(np.abs(y - want), initial=0.0) < 2e-5
        self.pos += len(y) * step
        covered = len(self.x) - self.half  # positions below this have their whole kernel
        assert covered <= self.pos < covered + step  # every one of them came out, no more


def chunks(in_rate: int, out_rate: int, seconds: float = 0.2):
    """Noise in chunks of odd sizes, each with a ratio off nominal by up to ±500 ppm."""
    rng = np.random.default_rng(7)
    x = (0.3 * rng.standard_normal(int(in_rate * seconds))).astype(np.float32)
    at = 0
    while at < len(x):
        size = int(rng.integers(1, 700))
        yield x[at : at + size], in_rate / out_rate * (1 + rng.uniform(-500e-6, 500e-6))
        at += size


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
def test_pulled_from_a_ring_the_output_is_the_windowed_sinc_at_each_position(in_rate, out_rate):
    """Receive: chunks pushed into a ring as a card's callback does, each pulled through
    the resampler into its store and taken out: the formula, carried input and position
    included."""
    resampler, capture, formula = _resampler(in_rate, out_rate), ring(), Formula(in_rate, out_rate)
    for chunk, step in chunks(in_rate, out_rate):
        capture.push(chunk)
        assert resampler.pull(capture.counters, capture.buf, step) == len(chunk)
        assert capture.level == 0
        y = np.empty(resampler.stored, np.float32)
        assert resampler.take(y) == len(y) and resampler.stored == 0
        formula.check(chunk, y, step)


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
def test_pushed_into_a_ring_the_output_is_the_windowed_sinc_at_each_position(in_rate, out_rate):
    """Transmit: frames pushed through the resampler into a playback ring: the formula."""
    resampler, playback, formula = _resampler(in_rate, out_rate), ring(), Formula(in_rate, out_rate)
    for chunk, step in chunks(in_rate, out_rate):
        assert resampler.push(chunk, playback.counters, playback.buf, step) == 0
        assert resampler.stored == 0  # nothing waits in the store on the way out
        formula.check(chunk, playback.pop_all(), step)


def test_a_backlog_beyond_one_pass_comes_out_whole():
    """A stalled tick finds seconds of capture waiting: it is resampled in several passes,
    with no seam between them."""
    resampler, capture, formula = _resampler(48000, 16000), ring(1 << 18), Formula(48000, 16000)
    backlog = (0.3 * np.random.default_rng(3).standard_normal(3 * 48000)).astype(np.float32)
    capture.push(backlog)
    assert resampler.pull(capture.counters, capture.buf, 3.0) == len(backlog)
    y = np.empty(resampler.stored, np.float32)
    resampler.take(y)
    formula.check(backlog, y, 3.0)


def test_a_full_store_leaves_the_rest_in_the_ring():
    """The store holds STORE outputs: what would not fit stays in the ring (which the
    card's callback then counts as dropped when it fills), and comes out later."""
    resampler, capture = _resampler(16000, 16000), ring(1 << 18)
    capture.push(np.ones(STORE + 5000, np.float32))
    got = resampler.pull(capture.counters, capture.buf, 1.0)
    assert STORE - 100 < resampler.stored <= STORE and got < STORE + 5000
    assert capture.level == STORE + 5000 - got
    resampler.cut(STORE)
    assert resampler.pull(capture.counters, capture.buf, 1.0) == STORE + 5000 - got


def test_the_store_keeps_order_through_take_cut_and_pad():
    """The receive store against a list: pad puts silence ahead of what waits (the gap is
    where the audio ran out), cut drops the oldest, take gives the oldest."""
    subject, twin = _resampler(48000, 16000), _resampler(48000, 16000)
    audio = (0.3 * np.random.default_rng(5).standard_normal(4800)).astype(np.float32)
    for resampler in (subject, twin):
        capture = ring()
        capture.push(audio)
        resampler.pull(capture.counters, capture.buf, 3.0)
    model = np.empty(twin.stored, np.float32)
    twin.take(model)
    model = [0.0] * 5 + list(model)
    subject.pad(5)
    assert subject.stored == len(model)
    assert subject.cut(3) == 3 and subject.cut(-1) == 0 and subject.pad(0) is None
    del model[:3]
    out = np.empty(10, np.float32)
    assert subject.take(out) == 10 and np.array_equal(out, model[:10])
    del model[:10]
    assert subject.cut(10**6) == len(model) and subject.stored == 0
    subject.pad(4)
    out = np.full(6, 9.0, np.float32)
    assert subject.take(out) == 4 and np.array_equal(out, [0, 0, 0, 0, 9, 9])


def test_bad_arguments_are_refused():
    table, slope = sinc_table(0.75, 8)
    with pytest.raises(ValueError, match="phases x taps"):
        Resampler(table, slope[:10], 16)
    with pytest.raises(ValueError, match="phases x taps"):
        Resampler(table, slope, 15)
    resampler, r = Resampler(table, slope, 16), ring()
    with pytest.raises(ValueError, match="step"):
        resampler.pull(r.counters, r.buf, 0.0)
    with pytest.raises(ValueError, match="step"):
        resampler.push(np.ones(4, np.float32), r.counters, r.buf, 100.0)
    with pytest.raises(ValueError, match="not a ring"):
        resampler.pull(r.counters[:2], r.buf, 1.0)
    assert table.shape == (_PHASES, 16)
