"""Tones: right frequencies, levels and cadences, identical however the stream is chunked."""

import numpy as np
import pytest
from gateway.codecs.pcm import dbfs
from gateway.codecs.tones import (
    DTMF_FREQS,
    CadencedTone,
    ToneGenerator,
    busy_tone,
    courtesy_tone,
    dtmf_digits,
    dtmf_tone,
    speech_like,
    talk_permit_tone,
)

RATE = 16000


def _peaks(x: np.ndarray, rate: int, count: int) -> list[float]:
    """The ``count`` strongest spectral peaks, to 1 Hz (zero-padded, windowed FFT)."""
    n = max(len(x), rate)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    is_peak = (spec[1:-1] > spec[:-2]) & (spec[1:-1] >= spec[2:])
    idx = np.flatnonzero(is_peak) + 1
    return sorted(float(freqs[i]) for i in idx[np.argsort(spec[idx])[-count:]])


def _read_chunked(src, total: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out, left = [], total
    while left:
        n = int(min(left, rng.integers(1, 500)))
        out.append(src.read(n))
        left -= n
    return np.concatenate(out)


def _on_segments(x: np.ndarray, rate: int, thresh_db: float = -40.0) -> list[tuple[float, float]]:
    """(start, end) seconds of spans above threshold, from 1 ms RMS blocks."""
    blk = rate // 1000
    levels = np.array([dbfs(x[i : i + blk]) for i in range(0, len(x) - blk + 1, blk)])
    on = np.concatenate(([False], levels > thresh_db, [False]))
    edges = np.flatnonzero(np.diff(on.astype(int)))
    return [(a / 1000, b / 1000) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def test_generator_frequency_and_level() -> None:
    x = ToneGenerator([1000.0], RATE, level_dbfs=-12.0).read(RATE)
    assert x.dtype == np.float32
    assert _peaks(x, RATE, 1) == [pytest.approx(1000.0, abs=1.0)]
    assert dbfs(x) == pytest.approx(-12.0, abs=0.05)
    dual = ToneGenerator([480.0, 620.0], RATE, level_dbfs=-12.0).read(RATE)
    assert _peaks(dual, RATE, 2) == [pytest.approx(480, abs=1), pytest.approx(620, abs=1)]
    assert dbfs(dual) == pytest.approx(-12.0, abs=0.05)


def test_generator_is_phase_continuous_across_any_chunking() -> None:
    whole = ToneGenerator([697.0, 1209.0], RATE).read(3 * RATE)
    pieces = _read_chunked(ToneGenerator([697.0, 1209.0], RATE), 3 * RATE)
    assert np.max(np.abs(whole - pieces)) < 1e-5


def test_generator_refuses_frequencies_above_nyquist() -> None:
    with pytest.raises(ValueError):
        ToneGenerator([5000.0], 8000)


def test_busy_tone_cadence_and_frequencies() -> None:
    x = _read_chunked(busy_tone(RATE), 3 * RATE)
    segs = _on_segments(x, RATE)
    assert len(segs) == 3
    for i, (start, end) in enumerate(segs):
        assert start == pytest.approx(i * 1.0, abs=0.003)
        assert end - start == pytest.approx(0.5, abs=0.006)
    assert _peaks(x[: RATE // 2], RATE, 2) == [pytest.approx(480, abs=2), pytest.approx(620, abs=2)]


def test_tone_edges_are_ramped_not_keyed() -> None:
    # Hard keying would splatter energy far from 480/620 Hz; ramps keep it ≥ 60 dB down.
    x = busy_tone(RATE).read(2 * RATE).astype(np.float64)
    spec = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    assert 10 * np.log10(spec[freqs > 2000].sum() / spec.sum()) < -60


def test_talk_permit_is_three_beeps_then_done() -> None:
    tone = talk_permit_tone(RATE)
    x = _read_chunked(tone, RATE // 2)
    segs = _on_segments(x, RATE)
    assert len(segs) == 3
    assert all(end - start == pytest.approx(0.06, abs=0.006) for start, end in segs)
    assert tone.done
    assert not np.any(x[int(0.3 * RATE) :])
    assert _peaks(x[: int(0.06 * RATE)], RATE, 1) == [pytest.approx(1000, abs=5)]


def test_courtesy_tone_rises_and_ends() -> None:
    tone = courtesy_tone(RATE)
    x = tone.read(RATE // 4)
    assert tone.done
    assert _peaks(x[: int(0.06 * RATE)], RATE, 1) == [pytest.approx(800, abs=5)]
    assert _peaks(x[int(0.06 * RATE) : int(0.12 * RATE)], RATE, 1) == [pytest.approx(1200, abs=5)]
    assert not np.any(x[int(0.12 * RATE) :])


@pytest.mark.parametrize("digit", list(DTMF_FREQS))
def test_dtmf_pairs(digit: str) -> None:
    tone = dtmf_tone(digit, 8000, duration_s=0.1, level_dbfs=-10.0)
    x = tone.read(800)
    assert tone.done
    low, high = DTMF_FREQS[digit]
    assert _peaks(x, 8000, 2) == [pytest.approx(low, abs=3), pytest.approx(high, abs=3)]
    assert dbfs(x[40:-40]) == pytest.approx(-10.0, abs=0.1)


def test_dtmf_keypad_is_standard() -> None:
    assert DTMF_FREQS["1"] == (697.0, 1209.0)
    assert DTMF_FREQS["0"] == (941.0, 1336.0)
    assert DTMF_FREQS["#"] == (941.0, 1477.0)
    assert DTMF_FREQS["D"] == (941.0, 1633.0)
    with pytest.raises(ValueError):
        dtmf_tone("E", 8000)


def test_dtmf_digits_timing() -> None:
    x = dtmf_digits("123", 8000, tone_s=0.05, gap_s=0.05)
    assert len(x) == 2400
    segs = _on_segments(x, 8000)
    assert [round(s, 2) for s, _ in segs] == [0.0, 0.1, 0.2]


def test_cadence_count_zero_length() -> None:
    tone = CadencedTone(ToneGenerator([1000.0], RATE), 0.1, 0.1, count=2)
    x = tone.read(RATE)
    assert tone.done and len(_on_segments(x, RATE)) == 2


def test_speech_like_is_deterministic_and_at_level() -> None:
    a = speech_like(RATE, 3.0, seed=4, level_dbfs=-12.0)
    assert np.array_equal(a, speech_like(RATE, 3.0, seed=4, level_dbfs=-12.0))
    assert not np.array_equal(a, speech_like(RATE, 3.0, seed=5, level_dbfs=-12.0))
    assert a.dtype == np.float32 and len(a) == 3 * RATE
    assert dbfs(a) == pytest.approx(-12.0, abs=0.01)
    assert np.max(np.abs(a)) < 1.0


def test_speech_like_has_syllables_pauses_and_a_voice_band_spectrum() -> None:
    x = speech_like(RATE, 10.0, seed=1).astype(np.float64)
    blk = RATE // 50
    levels = np.array([dbfs(x[i : i + blk]) for i in range(0, len(x), blk)])
    assert np.mean(levels < -60) > 0.1  # pauses between phrases
    # Syllabic rhythm: the envelope is modulated around 4 Hz far more than at 8-25 Hz.
    env = 10 ** (levels / 20)
    mod = np.abs(np.fft.rfft(env - env.mean())) ** 2
    mf = np.fft.rfftfreq(len(env), 1 / 50)
    assert mod[(mf >= 2.5) & (mf <= 6)].sum() > 5 * mod[(mf > 8) & (mf < 25)].sum()
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / RATE)
    assert spec[(f > 100) & (f < 4000)].sum() / spec.sum() > 0.9
    # Voiced: the strongest low-frequency component is a plausible f0 (100-220 Hz region).
    assert 80 < f[np.argmax(np.where(f < 300, spec, 0))] < 300
