"""CTCSS: decode timing, adjacent-tone discrimination, voice on top, and tone removal."""

import numpy as np
import pytest
from gateway.codecs.ctcss import CTCSS_TONES, CtcssDetector, SubAudibleFilter, detect_ctcss
from gateway.codecs.pcm import dbfs
from gateway.codecs.tones import ToneGenerator, speech_like

FRAME_S = 0.02


def run(det: CtcssDetector, x: np.ndarray, rate: int) -> np.ndarray:
    """Detector state after every 20 ms frame."""
    n = round(FRAME_S * rate)
    return np.array([det.feed(x[i : i + n]) for i in range(0, len(x), n)])


def tone(freq: float, rate: int, seconds: float, level: float = -20.0) -> np.ndarray:
    return ToneGenerator([freq], rate, level).read(round(seconds * rate))


def test_the_50_eia_tones() -> None:
    assert len(CTCSS_TONES) == 50
    assert CTCSS_TONES[0] == 67.0 and CTCSS_TONES[-1] == 254.1
    assert list(CTCSS_TONES) == sorted(CTCSS_TONES)
    assert {100.0, 103.5, 156.7, 162.2} <= set(CTCSS_TONES)
    assert all(isinstance(t, float) for t in CTCSS_TONES)


@pytest.mark.parametrize("rate", [8000, 16000])
@pytest.mark.parametrize("freq", [67.0, 100.0, 159.8, 254.1])
def test_opens_and_closes_in_radio_time(rate: int, freq: float) -> None:
    x = np.zeros(3 * rate, np.float32)
    x[rate // 2 : 2 * rate] = tone(freq, rate, 1.5)
    state = run(CtcssDetector(rate, freq), x, rate)
    on = np.flatnonzero(state)
    opened = (on[0] + 1) * FRAME_S - 0.5
    closed = (on[-1] + 1) * FRAME_S - 2.0
    assert 0.15 <= opened <= 0.25
    assert 0.15 <= closed <= 0.30
    assert state[on[0] : on[-1] + 1].all()  # one clean opening, no gaps


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(100.0, 103.5), (103.5, 100.0), (67.0, 69.3), (162.2, 159.8), (250.3, 254.1)],
)
def test_never_opens_on_the_adjacent_tone(ours: float, theirs: float) -> None:
    rate = 8000
    voice = speech_like(rate, 4.0, seed=1, level_dbfs=-12.0)
    assert not run(CtcssDetector(rate, ours), tone(theirs, rate, 4.0), rate).any()
    assert not run(CtcssDetector(rate, ours), tone(theirs, rate, 4.0) + voice, rate).any()
    assert run(CtcssDetector(rate, theirs), tone(theirs, rate, 4.0) + voice, rate).any()


@pytest.mark.parametrize(
    ("rate", "freq"),
    [
        (8000, 67.0),
        (8000, 123.0),
        (8000, 203.5),
        (16000, 100.0),
        (16000, 151.4),
        (16000, 171.3),
        (16000, 241.8),
    ],
)
def test_voice_on_top_does_not_make_it_chatter(rate: int, freq: float) -> None:
    # A talker keys up (tone at -20 dBFS) and starts speaking 0.3 s later, loud (-12 dBFS).
    seconds = 5.0
    x = tone(freq, rate, seconds)
    start = round(0.3 * rate)
    x[start:] += speech_like(rate, seconds - 0.3, seed=2, level_dbfs=-12.0)
    state = run(CtcssDetector(rate, freq), x, rate)
    on = np.flatnonzero(state)
    assert (on[0] + 1) * FRAME_S <= 0.25
    assert state[on[0] :].all()


@pytest.mark.parametrize("freq", [100.0, 141.3, 192.8])
def test_opens_when_voice_is_already_there(freq: float) -> None:
    rate = 16000
    x = tone(freq, rate, 3.0) + speech_like(rate, 3.0, seed=3, level_dbfs=-12.0)
    state = run(CtcssDetector(rate, freq), x, rate)
    assert state.any() and np.flatnonzero(state)[0] * FRAME_S < 1.0
    assert state[np.flatnonzero(state)[0] :].all()


@pytest.mark.parametrize("rate", [8000, 16000])
def test_voice_alone_never_opens(rate: int) -> None:
    # speech_like's fundamental glides through 100-220 Hz: the hardest place for CTCSS.
    voice = speech_like(rate, 6.0, seed=4, level_dbfs=-12.0)
    for freq in CTCSS_TONES[9:45:4]:
        assert not run(CtcssDetector(rate, freq), voice, rate).any(), freq


def test_another_agency_taking_the_channel_closes_it() -> None:
    rate = 8000
    x = np.concatenate((tone(100.0, rate, 2.0), tone(103.5, rate, 2.0)))
    state = run(CtcssDetector(rate, 100.0), x, rate)
    assert state[50:100].all()  # open during our tone (1.0-2.0 s)
    closed = np.flatnonzero(~state[100:])[0] * FRAME_S
    assert closed <= 0.4
    assert not state[100 + round(closed / FRAME_S) :].any()


@pytest.mark.parametrize("rate", [8000, 16000])
def test_detect_names_every_tone_alone_in_300_ms(rate: int) -> None:
    named = [detect_ctcss(tone(f, rate, 0.3), rate) for f in CTCSS_TONES]
    assert named == list(CTCSS_TONES)


def test_detect_names_every_tone_under_voice_in_1_s() -> None:
    rate = 8000
    voice = speech_like(rate, 1.0, seed=5, level_dbfs=-12.0)
    named = [detect_ctcss(tone(f, rate, 1.0) + voice, rate) for f in CTCSS_TONES]
    assert named == list(CTCSS_TONES)


def test_detect_names_nothing_in_voice_or_silence() -> None:
    rate = 8000
    voice = speech_like(rate, 6.0, seed=6, level_dbfs=-12.0)
    blocks = [voice[i : i + round(0.3 * rate)] for i in range(0, len(voice) - 2400, 800)]
    assert [detect_ctcss(b, rate) for b in blocks] == [None] * len(blocks)
    assert detect_ctcss(np.zeros(rate, np.float32), rate) is None
    assert detect_ctcss(tone(100.0, rate, 1.0, level=-50.0), rate) is None
    with pytest.raises(ValueError):
        detect_ctcss(np.zeros(rate // 5, np.float32), rate)


@pytest.mark.parametrize("rate", [8000, 16000])
def test_subaudible_filter_removes_tones_and_keeps_voice_band(rate: int) -> None:
    def through(freq: float) -> float:
        x = ToneGenerator([freq], rate, -10.0).read(rate)
        filt = SubAudibleFilter(rate)
        y = np.concatenate([filt.process(x[i : i + 320]) for i in range(0, rate, 320)])
        return dbfs(y[rate // 2 :]) - dbfs(x[rate // 2 :])

    assert through(100.0) <= -30.0
    assert all(through(f) <= -30.0 for f in CTCSS_TONES[::7] + (254.1,))
    assert abs(through(1000.0)) <= 1.0
    assert abs(through(400.0)) <= 1.0
    assert abs(through(3000.0)) <= 1.0


def test_subaudible_filter_is_seamless_across_frames() -> None:
    rate = 16000
    x = speech_like(rate, 1.0, seed=7)
    whole = SubAudibleFilter(rate).process(x)
    filt = SubAudibleFilter(rate)
    parts = np.concatenate([filt.process(x[i : i + 137]) for i in range(0, len(x), 137)])
    assert parts.dtype == np.float32
    assert np.max(np.abs(whole - parts)) < 1e-6


def test_non_eia_tone_is_decoded_too() -> None:
    # 150.0 Hz is common in some fleets though not in EIA/TIA-603.
    rate = 8000
    assert run(CtcssDetector(rate, 150.0), tone(150.0, rate, 1.0), rate)[-1]
    assert not run(CtcssDetector(rate, 150.0), tone(151.4, rate, 1.0), rate).any()
    with pytest.raises(ValueError):
        CtcssDetector(rate, 400.0)
