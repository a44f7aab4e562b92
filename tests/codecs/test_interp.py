"""The variable-ratio sinc interpolator: its C loop computes what the formula says."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gateway.codecs import _sinc
from gateway.codecs.interp import _PHASES, SincInterpolator, kaiser_sinc


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


@pytest.mark.parametrize(("in_rate", "out_rate"), [(48000, 16000), (16000, 48000), (44100, 16000)])
def test_streamed_output_is_the_windowed_sinc_at_each_position(in_rate, out_rate):
    """Chunks of odd sizes at a ratio that changes every call (drift control), against the
    formula over the whole input: the carried history and position are right too."""
    band = min(1.0, out_rate / in_rate)
    cutoff, half = 0.75 * band, math.ceil(8 / band)
    interp = SincInterpolator(cutoff, half)
    rng = np.random.default_rng(7)
    x = (0.3 * rng.standard_normal(in_rate // 5)).astype(np.float32)
    padded = np.concatenate((np.zeros(2 * half - 1, np.float32), x))  # the history's start
    got, pos, at = [], float(half - 1), 0
    while at < len(x):
        chunk = int(rng.integers(1, 700))
        step = in_rate / out_rate * (1 + rng.uniform(-500e-6, 500e-6))
        y = interp.process(x[at : at + chunk], step)
        at = min(at + chunk, len(x))
        want = by_formula(padded, pos, step, len(y), cutoff, half)
        assert np.max(np.abs(y - want), initial=0.0) < 2e-5
        got.append(y)
        pos += len(y) * step
        covered = (2 * half - 1 + at) - half  # positions below this have their whole kernel
        assert covered <= pos < covered + step  # every one of them came out, and no more
    assert sum(len(y) for y in got) > 0


def test_the_loop_never_reads_outside_the_buffer():
    table = np.zeros((_PHASES, 16), np.float32)
    out = np.empty(10, np.float32)
    buf = np.zeros(30, np.float32)
    with pytest.raises(ValueError, match="outside the buffer"):
        _sinc.interpolate(buf, table, table, 7.0, 3.0, _PHASES, 16, out)  # 7 + 27 + 8 > 30
    with pytest.raises(ValueError, match="outside the buffer"):
        _sinc.interpolate(buf, table, table, 6.0, 1.0, _PHASES, 16, out)  # 6 - 7 < 0
    with pytest.raises(ValueError, match="phases x taps"):
        _sinc.interpolate(buf, table[:10], table, 8.0, 1.0, _PHASES, 16, out)
