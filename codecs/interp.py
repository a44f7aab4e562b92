"""Low-latency windowed-sinc interpolation, streaming, for fixed and variable ratios.

soxr's DFT engine holds back 37–175 ms when fed frame by frame, which alone
breaks the latency budget (a radio hop may hold one frame plus what drift
control needs). A Kaiser-windowed sinc holds back only half its kernel: a
few milliseconds. Two flavours share the kernel:

* :class:`RationalInterpolator` — fixed ratio L/M, exact integer positions,
  one precomputed kernel row per phase (at most L rows);
* :func:`sinc_table` — for a step changeable on every call (clock-drift
  correction): kernel rows interpolated from a 512-phase table (the sound card's
  resampler, ``hardware/_elastic.c``, runs it).

Per call all output positions are computed at once and applied with one
gather and one row-wise dot; no Python loop runs over samples. Output *k*
represents input time ``k·step − half_width``, so the latency is exactly
``half_width`` input samples.
"""

from __future__ import annotations

import numpy as np

_PHASES = 512


def kaiser_sinc(frac: np.ndarray, cutoff: float, half_width: int, beta: float) -> np.ndarray:
    """Kernel rows for fractional positions ``frac`` in [0, 1] over taps -(R-1)..R.

    ``cutoff`` is the band edge as a fraction of the input Nyquist; every row
    is normalised to unity DC gain so a varying ratio cannot modulate level.
    """
    offsets = np.arange(-(half_width - 1), half_width + 1)[None, :]
    t = offsets - np.asarray(frac, dtype=np.float64)[:, None]
    inside = np.clip(1.0 - (t / half_width) ** 2, 0.0, None)
    window = np.i0(beta * np.sqrt(inside)) / np.i0(beta)
    kernel = cutoff * np.sinc(cutoff * t) * window
    return kernel / kernel.sum(axis=1, keepdims=True)


class _History:
    """Carried input so each output's kernel sees its left context across calls."""

    def __init__(self, half_width: int) -> None:
        if half_width < 1:
            raise ValueError("half_width must be positive")
        self.half_width = int(half_width)
        self.offsets = np.arange(-(self.half_width - 1), self.half_width + 1)
        self.buf = np.zeros(2 * self.half_width - 1, dtype=np.float32)

    def extend(self, x: np.ndarray) -> np.ndarray:
        self.buf = np.concatenate((self.buf, np.asarray(x, dtype=np.float32).ravel()))
        return self.buf

    def drop_before(self, index: int) -> None:
        self.buf = self.buf[index:]


class RationalInterpolator:
    """Fixed-ratio resampler: ``up`` output samples for every ``down`` input samples."""

    def __init__(self, up: int, down: int, cutoff: float, half_width: int, beta: float = 7.0):
        self._up, self._down = int(up), int(down)
        self._hist = _History(half_width)
        self._rows = kaiser_sinc(np.arange(self._up) / self._up, cutoff, half_width, beta).astype(
            np.float32
        )
        # Next output position, in units of 1/up input samples, relative to the buffer start.
        self._num = (self._hist.half_width - 1) * self._up

    def process(self, x: np.ndarray) -> np.ndarray:
        """Consume ``x``; cumulative output is exactly ``ceil(total_in · up / down)``."""
        h = self._hist
        buf = h.extend(x)
        limit = (len(buf) - h.half_width) * self._up
        n = max(0, -((self._num - limit) // self._down))  # ceil((limit - num) / down)
        num = self._num + self._down * np.arange(n, dtype=np.int64)
        base, phase = np.divmod(num, self._up)
        y = self._by_phase(buf, base, phase) if self._up <= 8 else self._gather(buf, base, phase)
        self._num += n * self._down
        keep_from = self._num // self._up - (h.half_width - 1)
        h.drop_before(keep_from)
        self._num -= keep_from * self._up
        return y

    def _gather(self, buf: np.ndarray, base: np.ndarray, phase: np.ndarray) -> np.ndarray:
        """Any number of phases: one (outputs × taps) gather and row-wise dot."""
        return np.einsum("ij,ij->i", buf[base[:, None] + self._hist.offsets], self._rows[phase])

    def _by_phase(self, buf: np.ndarray, base: np.ndarray, phase: np.ndarray) -> np.ndarray:
        """Few phases (8k↔16k↔48k): one C-level correlation per phase is 2–3× faster."""
        y = np.empty(len(base), dtype=np.float32)
        if len(base) == 0:
            return y
        first, left = int(base[0]), self._hist.half_width - 1
        span = buf[first - left : int(base[-1]) + self._hist.half_width + 1]
        # Outputs j, j+up, j+2·up … share a phase and sit ``down`` input samples apart.
        for j in range(min(self._up, len(base))):
            dots = np.correlate(span, self._rows[phase[j]], "valid")
            y[j :: self._up] = dots[base[j] - first :: self._down][: len(y[j :: self._up])]
        return y


def sinc_table(cutoff: float, half_width: int, beta: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """A variable-ratio resampler's kernel: ``_PHASES`` rows of ``2·half_width`` taps, and
    each row's slope to the next, for blending rows at any fraction (float32 both).

    The resampler itself is the sound card's (``hardware/_elastic.c``): its loop over
    output samples runs with the card's rings, once per move."""
    table = kaiser_sinc(np.arange(_PHASES + 1) / _PHASES, cutoff, half_width, beta)
    table = table.astype(np.float32)
    return np.ascontiguousarray(table[:-1]), np.diff(table, axis=0)
