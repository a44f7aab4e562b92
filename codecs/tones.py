"""Streaming call-progress and signalling tones, plus deterministic test speech.

The engine pulls one frame per tick, so every tone is an object with
``read(n) -> float32`` that carries its phase and cadence position between
calls: a tone split across frames is sample-identical to one generated in a
single call. Finite tones (talk permit, courtesy, DTMF) report ``done``.

Levels follow :func:`.pcm.dbfs`: ``level_dbfs`` is the RMS of the whole
tone (all components together) while it is on, so a meter reads it back.
On/off edges get 4 ms raised-cosine ramps: hard keying splatters energy
across the band, which a DTMF detector downstream would see as talk-off.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Keypad layout: row (low group) frequencies × column (high group) frequencies.
DTMF_ROWS = (697.0, 770.0, 852.0, 941.0)
DTMF_COLS = (1209.0, 1336.0, 1477.0, 1633.0)
DTMF_KEYS = ("123A", "456B", "789C", "*0#D")
DTMF_FREQS: dict[str, tuple[float, float]] = {
    key: (DTMF_ROWS[r], DTMF_COLS[c])
    for r, keys in enumerate(DTMF_KEYS)
    for c, key in enumerate(keys)
}

_RAMP_S = 0.004


def _amplitude(level_dbfs: float, n_tones: int) -> float:
    """Per-component peak so that n equal sines sum to ``level_dbfs`` RMS."""
    return float(10.0 ** (level_dbfs / 20.0) * np.sqrt(2.0 / max(n_tones, 1)))


class ToneGenerator:
    """Continuous sum of sines, phase-continuous across ``read`` calls."""

    done = False

    def __init__(self, freqs: Sequence[float], rate: int, level_dbfs: float = -12.0) -> None:
        self.rate = int(rate)
        self.freqs = np.asarray(freqs, dtype=np.float64).reshape(-1)
        if np.any(self.freqs >= self.rate / 2) or np.any(self.freqs < 0):
            raise ValueError(f"tone frequencies must lie in [0, {self.rate / 2}) Hz")
        self._amp = _amplitude(level_dbfs, len(self.freqs))
        self._inc = 2.0 * np.pi * self.freqs / self.rate
        self._phase = np.zeros_like(self.freqs)

    def read(self, n: int) -> np.ndarray:
        """Next ``n`` samples."""
        ph = self._phase[:, None] + self._inc[:, None] * np.arange(n)
        self._phase = np.mod(self._phase + self._inc * n, 2.0 * np.pi)
        return (self._amp * np.sin(ph).sum(axis=0)).astype(np.float32)


def _ramp_envelope(t: np.ndarray, length: int, ramp: int) -> np.ndarray:
    """Raised-cosine fade in and out over ``ramp`` samples at both ends of [0, length)."""
    edge = np.minimum(t + 0.5, length - t - 0.5) / max(ramp, 1)
    return np.where(edge >= 1.0, 1.0, 0.5 - 0.5 * np.cos(np.pi * np.clip(edge, 0.0, 1.0)))


class CadencedTone:
    """Gate a generator on/off (busy, ring-back, talk-permit beeps), with soft edges.

    ``count`` limits the number of on/off cycles; ``None`` repeats forever.
    The generator keeps running while gated off, so its phase stays continuous.
    """

    def __init__(
        self, generator: ToneGenerator, on_s: float, off_s: float, count: int | None = None
    ) -> None:
        self.generator = generator
        rate = generator.rate
        self._on = round(on_s * rate)
        self._period = self._on + round(off_s * rate)
        self._total = None if count is None else count * self._period
        self._ramp = min(round(_RAMP_S * rate), self._on // 2)
        self._pos = 0

    @property
    def done(self) -> bool:
        return self._total is not None and self._pos >= self._total

    def read(self, n: int) -> np.ndarray:
        """Next ``n`` samples (silence once a counted cadence has finished)."""
        idx = self._pos + np.arange(n)
        self._pos += n
        t = idx % self._period
        gate = np.where(t < self._on, _ramp_envelope(t, self._on, self._ramp), 0.0)
        if self._total is not None:
            gate = np.where(idx < self._total, gate, 0.0)
        return (self.generator.read(n) * gate).astype(np.float32)


class ToneSequence:
    """Play steps of (frequencies, seconds) once; empty frequencies mean silence.

    Each step starts at phase zero with ramped edges, which is how repeater
    controllers build multi-note courtesy tones.
    """

    def __init__(
        self, steps: Sequence[tuple[Sequence[float], float]], rate: int, level_dbfs: float = -12.0
    ) -> None:
        self.rate = int(rate)
        self._steps = [(np.asarray(f, dtype=np.float64), round(s * rate)) for f, s in steps]
        self._starts = np.cumsum([0] + [length for _, length in self._steps])
        self._level = level_dbfs
        self._pos = 0

    @property
    def length(self) -> int:
        """Total samples in the sequence."""
        return int(self._starts[-1])

    @property
    def done(self) -> bool:
        return self._pos >= self.length

    def read(self, n: int) -> np.ndarray:
        """Next ``n`` samples (silence after the last step)."""
        idx = self._pos + np.arange(n)
        self._pos += n
        out = np.zeros(n, dtype=np.float64)
        for i, (freqs, length) in enumerate(self._steps):  # a handful of steps, not samples
            sel = (idx >= self._starts[i]) & (idx < self._starts[i + 1])
            if not freqs.size or not sel.any():
                continue
            t = idx[sel] - self._starts[i]
            env = _ramp_envelope(t, length, min(round(_RAMP_S * self.rate), length // 2))
            sines = np.sin(2.0 * np.pi * freqs[:, None] * t / self.rate).sum(axis=0)
            out[sel] = _amplitude(self._level, freqs.size) * env * sines
        return out.astype(np.float32)


def busy_tone(rate: int, level_dbfs: float = -16.0) -> CadencedTone:
    """North American busy (ANSI T1.401 / Bellcore): 480 + 620 Hz, 0.5 s on / 0.5 s off.

    Played to a talker who keys up while another holds the floor.
    """
    return CadencedTone(ToneGenerator((480.0, 620.0), rate, level_dbfs), 0.5, 0.5)


def talk_permit_tone(rate: int, level_dbfs: float = -14.0) -> CadencedTone:
    """Three quick 1 kHz beeps (60 ms on / 40 ms off, 300 ms in all), trunked-radio style.

    Tells a talker the floor is theirs so they do not clip their first word.
    """
    return CadencedTone(ToneGenerator((1000.0,), rate, level_dbfs), 0.06, 0.04, count=3)


def courtesy_tone(rate: int, level_dbfs: float = -16.0) -> ToneSequence:
    """Repeater "roger beep": 800 Hz then 1200 Hz, 60 ms each, sent when a talker unkeys.

    The rising pair is recognisable under noise and short enough (120 ms) not to
    hold the channel; it tells listeners the over is finished.
    """
    return ToneSequence([((800.0,), 0.06), ((1200.0,), 0.06)], rate, level_dbfs)


def dtmf_tone(
    digit: str, rate: int, duration_s: float = 0.1, level_dbfs: float = -10.0
) -> ToneSequence:
    """One DTMF key press (ITU-T Q.23 pair; digits 0-9, A-D, * and #), both tones equal level."""
    key = digit.upper()
    if key not in DTMF_FREQS:
        raise ValueError(f"not a DTMF key: {digit!r}")
    return ToneSequence([(DTMF_FREQS[key], duration_s)], rate, level_dbfs)


def dtmf_digits(
    digits: str, rate: int, tone_s: float = 0.1, gap_s: float = 0.1, level_dbfs: float = -10.0
) -> np.ndarray:
    """A whole dialled string as one buffer: tone, gap, tone, gap … (gap after the last too)."""
    keys = digits.upper()
    if any(k not in DTMF_FREQS for k in keys):
        raise ValueError(f"not a DTMF string: {digits!r}")
    steps = [s for k in keys for s in ((DTMF_FREQS[k], tone_s), ((), gap_s))]
    seq = ToneSequence(steps, rate, level_dbfs)
    return seq.read(seq.length)


def speech_like(rate: int, seconds: float, seed: int = 0, level_dbfs: float = -18.0) -> np.ndarray:
    """Deterministic speech-like audio for detector talk-off tests and demos.

    Real speech is what fools tone detectors: a harmonic series whose f0
    glides (100–220 Hz), formants that move per syllable, a ~4 Hz syllabic
    envelope, fricative noise and pauses between phrases. Synthesised from a
    seed so a test failure reproduces exactly. ``level_dbfs`` is the RMS over
    the whole clip, pauses included.
    """
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate

    # Syllables (~4 Hz) grouped into phrases separated by pauses.
    bounds, vowels, voiced = [0.0], [], []
    while bounds[-1] < seconds:
        for _ in range(rng.integers(3, 9)):
            bounds.append(bounds[-1] + rng.uniform(0.16, 0.32))
            vowels.append((rng.uniform(300, 800), rng.uniform(900, 2300)))
            voiced.append(1.0)
        bounds.append(bounds[-1] + rng.uniform(0.15, 0.6))
        vowels.append(vowels[-1])
        voiced.append(0.0)
    bounds_a = np.asarray(bounds)
    syl = np.clip(np.searchsorted(bounds_a, t, side="right") - 1, 0, len(voiced) - 1)
    start, length = bounds_a[syl], np.diff(bounds_a)[syl]
    u = (t - start) / length
    envelope = np.asarray(voiced)[syl] * np.sin(np.pi * u) ** 0.7

    # Formants glide toward each syllable's vowel; f0 wanders with a falling phrase contour.
    f1 = np.interp(t, bounds_a[:-1] + 0.5 * np.diff(bounds_a), [v[0] for v in vowels])
    f2 = np.interp(t, bounds_a[:-1] + 0.5 * np.diff(bounds_a), [v[1] for v in vowels])
    p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
    f0 = 160 + 45 * np.sin(2 * np.pi * 0.31 * t + p1) + 15 * np.sin(2 * np.pi * 1.9 * t + p2)
    f0 = np.clip(f0 - 20 * u, 100, 220)
    phase = 2 * np.pi * np.cumsum(f0) / rate

    voice = np.zeros(n)
    # The vocal tract scatters harmonic phases; aligned phases would give a click train's crest.
    offsets = rng.uniform(0, 2 * np.pi, size=int(min(0.45 * rate, 4000) // 100) + 1)
    for k in range(1, len(offsets)):  # loop over harmonics only
        fk = k * f0
        shape = sum(
            1.0 / (1.0 + ((fk - fc) / bw) ** 2)
            for fc, bw in ((f1, 90.0), (f2, 120.0), (2600.0, 180.0), (3400.0, 250.0))
        )
        voice += np.where(fk < 0.45 * rate, shape / k, 0.0) * np.sin(k * phase + offsets[k])

    # Fricative onsets: brief high-tilted noise at the start of voiced syllables.
    noise = np.diff(rng.standard_normal(n + 1))
    fric = np.where(u < 0.15, 1.0, 0.0) * np.asarray(voiced)[syl] * 0.08 * noise
    x = envelope * voice + fric
    # Radios limit deviation, so peaks are soft-clipped as a transmitter's limiter would;
    # a few passes settle the gain so the RMS still lands on the requested level.
    target = 10.0 ** (level_dbfs / 20.0)
    gain = target / (np.sqrt(np.mean(x**2)) or 1.0)
    for _ in range(6):
        y = _soft_limit(x * gain)
        gain *= target / (np.sqrt(np.mean(y**2)) or 1.0)
    return _soft_limit(x * gain).astype(np.float32)


def _soft_limit(x: np.ndarray, knee: float = 0.6, ceiling: float = 0.98) -> np.ndarray:
    """Linear below ``knee``, tanh-compressed above, never beyond ``ceiling``."""
    over = np.abs(x) - knee
    squashed = knee + (ceiling - knee) * np.tanh(over / (ceiling - knee))
    return np.where(over > 0, np.sign(x) * squashed, x)
