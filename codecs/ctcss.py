"""CTCSS (sub-audible tone squelch, EIA/TIA-603): decode, identify, and strip.

A radio port opens its squelch on the right tone and must not open on
speech or on a neighbouring agency's tone; audio forwarded to other ports
must not carry the tone (a listener would hear a hum, and another gateway
might falsely decode it).

Every 50 ms, each frequency of interest gets a *sub-block phasor* (a
single-bin DFT referenced to absolute time), so a steady tone gives the same
phasor block after block while speech harmonics — which glide — do not. The
tone estimate over a window is the coordinate-wise median of its phasors:
a harmonic crossing the bin in a minority of sub-blocks cannot move it, and
a tone 2.3 Hz away (the closest EIA spacing) rotates and shrinks it.

:class:`CtcssDetector` opens when, over the last 200 ms, the tone is steady
(present in every sub-block, coherent, and drifting in phase no faster
than a tone within 40 % of the gap to its EIA neighbour would), above
``min_level_dbfs``, and free of the partials a voice would bring (2f, f/2,
f/3 at least 10 dB down). It holds
while the median level over 300 ms stays within ``hysteresis_db`` of the
threshold and no *steady* neighbour tone is stronger (another agency taking
the channel), and closes after two failing 50 ms steps. Measured with 20 ms
frames: opens 200 ms after the tone starts (up to ~0.8 s if loud voice is
already on it), closes 240 ms after it stops, never chatters under voice.
"""

from __future__ import annotations

import functools

import numpy as np

from .goertzel import BinBank

#: The 50 EIA/TIA-603 tones, Hz (150.0 and the "split" tones are not in the standard set).
CTCSS_TONES: tuple[float, ...] = (
    67.0,
    69.3,
    71.9,
    74.4,
    77.0,
    79.7,
    82.5,
    85.4,
    88.5,
    91.5,
    94.8,
    97.4,
    100.0,
    103.5,
    107.2,
    110.9,
    114.8,
    118.8,
    123.0,
    127.3,
    131.8,
    136.5,
    141.3,
    146.2,
    151.4,
    156.7,
    159.8,
    162.2,
    165.5,
    167.9,
    171.3,
    173.8,
    177.3,
    179.9,
    183.5,
    186.2,
    189.9,
    192.8,
    196.6,
    199.5,
    203.5,
    206.5,
    210.7,
    218.1,
    225.7,
    229.1,
    233.6,
    241.8,
    250.3,
    254.1,
)

_SUB_S = 0.05
_OPEN_SUBS = 4
_HOLD_SUBS = 6
_CLOSE_STEPS = 2
# A voice harmonic at f comes with partials at 2f and usually at f/2 or f/3; a CTCSS
# tone is alone. These multiples of the tone are checked before it is believed.
_RELATED = (2.0, 1 / 2, 1 / 3)
_COHERENCE = 10 ** (-1.5 / 20)


class _Phasors:
    """One absolute-time phasor per frequency per 50 ms sub-block, straight from the stream.

    A 50 ms single-bin DFT at full rate needs no anti-alias filter: its
    sidelobes fall 6 dB/octave, so voice at 500 Hz and above leaks in ≥ 35 dB
    down, and it costs less than any decimation filter would.
    """

    def __init__(self, rate: int, freqs: np.ndarray) -> None:
        self.rate = int(rate)
        self.freqs = np.asarray(freqs, dtype=np.float64)
        self.sub = round(_SUB_S * self.rate)
        self._bank = _bank(tuple(self.freqs), self.sub, self.rate)
        self._pending = np.zeros(0)
        self._n0 = 0  # absolute sample index of _pending[0]

    @property
    def sub_s(self) -> float:
        return self.sub / self.rate

    def feed(self, x: np.ndarray) -> np.ndarray:
        """Return phasors (n_new_sub_blocks × n_freqs) completed by ``x``."""
        buf = np.concatenate((self._pending, np.asarray(x, dtype=np.float64).ravel()))
        count = len(buf) // self.sub
        self._pending = buf[count * self.sub :]
        if count == 0:
            return np.zeros((0, len(self.freqs)), dtype=np.complex128)
        starts = self._n0 + self.sub * np.arange(count)
        self._n0 += count * self.sub
        # Reference every sub-block to absolute time, so a steady tone keeps its phase.
        cycles = np.mod(np.outer(starts, self.freqs) / self.rate, 1.0)
        return self._bank(buf[: count * self.sub]) * np.exp(-2j * np.pi * cycles)

    def power(self, phasors: np.ndarray) -> np.ndarray:
        """Mean-square tone level from a phasor (or phasor estimate)."""
        return self._bank.power(phasors)


@functools.lru_cache(maxsize=16)
def _bank(freqs: tuple[float, ...], n: int, rate: int) -> BinBank:
    """Share the (immutable) DFT basis between detectors of the same tone and rate."""
    return BinBank(np.array(freqs), n, rate)


def _median(a: np.ndarray) -> np.ndarray:
    """Median along axis 0; np.median's generality costs ~50 µs a call at this size."""
    s = np.sort(a, axis=0)
    n = len(s)
    return 0.5 * (s[(n - 1) // 2] + s[n // 2])


def _median_phasor(p: np.ndarray) -> np.ndarray:
    """Coordinate-wise median over sub-blocks (axis 0): robust to a minority of outliers."""
    return _median(p.real) + 1j * _median(p.imag)


def _tolerance_hz(tone_hz: float) -> float:
    """Accept a tone this far off its bin: 40 % of the gap to the nearest EIA neighbour."""
    lo, hi = _neighbours(tone_hz)
    return min(1.5, 0.4 * min(tone_hz - lo, hi - tone_hz))


def _neighbours(tone_hz: float) -> tuple[float, float]:
    """Closest EIA tones below/above; for a non-EIA tone, ±3 % stands in for them."""
    below = [t for t in CTCSS_TONES if t < tone_hz - 0.05]
    above = [t for t in CTCSS_TONES if t > tone_hz + 0.05]
    return (below[-1] if below else tone_hz * 0.97), (above[0] if above else tone_hz * 1.03)


class CtcssDetector:
    """Streaming squelch decoder for one tone; ``feed`` returns whether it is present now."""

    def __init__(
        self,
        rate: int,
        tone_hz: float,
        *,
        min_level_dbfs: float = -40.0,
        hysteresis_db: float = 6.0,
        harmonic_db: float = 10.0,
    ) -> None:
        if not 30.0 <= tone_hz <= 300.0:  # EIA is 67-254.1 Hz; some fleets use others
            raise ValueError(f"CTCSS tone must be 30–300 Hz, not {tone_hz:g}")
        self.tone_hz = float(tone_hz)
        lo, hi = _neighbours(self.tone_hz)
        related = self.tone_hz * np.array(_RELATED)
        self._ph = _Phasors(rate, np.concatenate(([self.tone_hz, lo, hi], related)))
        self._open_power = 10 ** (min_level_dbfs / 10)
        self._hold_power = self._open_power / 10 ** (hysteresis_db / 10)
        self._tolerance_hz = _tolerance_hz(self.tone_hz)
        self._neighbour_tolerance = np.array([_tolerance_hz(lo), _tolerance_hz(hi)])
        self._harmonic = 10 ** (-harmonic_db / 10)
        self._history = np.zeros((0, 3 + len(_RELATED)), dtype=np.complex128)
        self._present = False
        self._failures = 0

    @property
    def present(self) -> bool:
        return self._present

    def feed(self, frame: np.ndarray) -> bool:
        """Consume a frame; return the (debounced) tone-present state after it."""
        new = self._ph.feed(frame)
        for row in new:  # one decision per 50 ms sub-block, not per sample
            self._history = np.vstack((self._history, row))[-_HOLD_SUBS:]
            self._decide()
        return self._present

    def _decide(self) -> None:
        if not self._present:
            recent = self._history[-_OPEN_SUBS:]
            if len(recent) == _OPEN_SUBS and self._opens(recent):
                self._present, self._failures = True, 0
            return
        if self._holds(self._history):
            self._failures = 0
        else:
            self._failures += 1
            if self._failures >= _CLOSE_STEPS:
                self._present = False

    def _opens(self, recent: np.ndarray) -> bool:
        p = self._ph.power(_median_phasor(recent))
        return bool(
            _steady_tones(recent[:, :1], self._ph.sub_s, np.array([self._tolerance_hz]))[0]
            and p[0] >= self._open_power
            and max(p[3:]) <= self._harmonic * p[0]
        )

    def _holds(self, window: np.ndarray) -> bool:
        level = self._ph.power(_median_phasor(window[:, :1]))[0]
        # Voice may swamp our bin for a moment; only a *steady* neighbour tone that is
        # stronger than ours (another agency's radio taking the channel) ends the hold.
        power = self._ph.power(window[:, :3].mean(axis=0))
        steady = _steady_tones(window[:, 1:3], self._ph.sub_s, self._neighbour_tolerance)
        taken_over = bool(np.any(steady & (power[1:] > power[0])))
        return bool(level >= self._hold_power and not taken_over)


def _steady_tones(
    phasors: np.ndarray, sub_s: float, tolerance_hz: np.ndarray, quorum: float = 1.0
) -> np.ndarray:
    """Per column: is this a steady tone within ``tolerance_hz`` of its bin?

    Steady means present in (a ``quorum`` of) the sub-blocks at a similar level (not
    below half the median), turning from one sub-block to the next by no more than
    the tolerance allows, and coherent: the median phasor keeps ≥ 84 % (-1.5 dB) of
    the median magnitude. A gliding voice harmonic or a neighbouring tone (0.72 rad
    per 50 ms at 2.3 Hz off) fails; a true tone, even under loud voice, passes.
    """
    mags = np.abs(phasors)
    level = _median(mags)
    turns = np.angle(phasors[1:] * np.conj(phasors[:-1]))
    per_step = 2 * np.pi * tolerance_hz * sub_s
    coherent = np.abs(_median_phasor(phasors))
    return (
        (coherent >= _COHERENCE * level)
        & (np.mean(mags >= 0.5 * level, axis=0) >= quorum)
        & (np.mean(np.abs(turns) <= 2 * per_step, axis=0) >= quorum)
        & (np.abs(_median(turns)) <= per_step)
    )


_TOLERANCES = np.array([_tolerance_hz(t) for t in CTCSS_TONES])
_ALL_FREQS = np.concatenate([np.asarray(CTCSS_TONES) * k for k in (1.0, *_RELATED)])


def detect_ctcss(x: np.ndarray, rate: int, min_level_dbfs: float = -40.0) -> float | None:
    """Name the EIA tone carried by a block of audio (≥ 0.3 s), or None.

    For setting up a port ("what tone does this radio send?") and for logs.
    The winner is the strongest tone that is steady in phase and level across
    (60 % of) the block's 50 ms sub-blocks — voice harmonics glide — without
    the 2f, f/2, f/3 partials a voice has, and above ``min_level_dbfs``.
    Measured under voice 8 dB louder than the tone: 0.3 s blocks name it in
    ~97 % of cases and say None otherwise (no wrong tone seen); 1 s blocks
    always name it.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if len(x) < 0.3 * rate:
        raise ValueError("need at least 0.3 s of audio to separate adjacent CTCSS tones")
    tones = np.asarray(CTCSS_TONES)
    ph = _Phasors(rate, _ALL_FREQS)
    phasors = ph.feed(x)
    fund_ph, harm_ph = phasors[:, : len(tones)], phasors[:, len(tones) :]
    fund = ph.power(_median_phasor(fund_ph))
    # Coherent (median-phasor) harmonic: a steady voice fundamental brings a steady
    # second harmonic; voice merely passing through 2f does not count against a tone.
    harm = ph.power(_median_phasor(harm_ph)).reshape(len(_RELATED), len(tones)).max(axis=0)
    ok = (
        (fund >= 10 ** (min_level_dbfs / 10))
        & (harm <= 0.1 * fund)
        & _steady_tones(fund_ph, ph.sub_s, _TOLERANCES, quorum=0.6)
    )
    if not ok.any():
        return None
    return float(tones[int(np.argmax(np.where(ok, fund, 0.0)))])


class SubAudibleFilter:
    """Streaming high-pass that strips CTCSS/DCS from received audio before it is forwarded.

    Elliptic, 6th order: ≤ 0.5 dB ripple above ``cutoff_hz``, ≥ 40 dB down
    below 0.88·cutoff (266 Hz: all 50 EIA tones at the default 300 Hz). Voice below
    300 Hz is expendable on a radio channel; a hum on every patch is not.
    """

    def __init__(self, rate: int, cutoff_hz: float = 300.0) -> None:
        from scipy import signal  # imported here: a second of start-up most sites never use

        self._sosfilt = signal.sosfilt
        self._sos = signal.ellip(6, 0.5, 40, cutoff_hz, "highpass", fs=rate, output="sos")
        self._zi = np.zeros((self._sos.shape[0], 2))

    def process(self, x: np.ndarray) -> np.ndarray:
        """Filter one frame; state carries over so frame joints are seamless."""
        y, self._zi = self._sosfilt(self._sos, np.asarray(x, dtype=np.float64), zi=self._zi)
        return y.astype(np.float32)
