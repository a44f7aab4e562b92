"""DTMF detection: every key in noise, Q.24 timing, and no talk-off on speech or music."""

import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr
from gateway.codecs.dtmf import DtmfDetector
from gateway.codecs.g711 import ulaw_decode_float, ulaw_encode_float
from gateway.codecs.tones import DTMF_FREQS, ToneGenerator, dtmf_digits, dtmf_tone, speech_like

from tests.conftest import require_binary

RATES = [8000, 16000]


def detect(x: np.ndarray, rate: int, frame_ms: int = 20, det: DtmfDetector | None = None) -> str:
    det = det or DtmfDetector(rate)
    step = rate * frame_ms // 1000
    return "".join(k for i in range(0, len(x), step) for k in det.feed(x[i : i + step]))


def pad(x: np.ndarray, rate: int, lead_s: float = 0.05, tail_s: float = 0.2) -> np.ndarray:
    z = np.zeros
    return np.concatenate((z(round(lead_s * rate)), x, z(round(tail_s * rate)))).astype(np.float32)


def dual(
    key: str,
    rate: int,
    seconds: float,
    low_db: float = -13.0,
    high_db: float = -13.0,
    detune: float = 1.0,
) -> np.ndarray:
    """A key's two tones at independent levels (dBFS RMS each) and a common frequency error."""
    t = np.arange(round(seconds * rate)) / rate
    low, high = DTMF_FREQS[key]
    amp = lambda db: np.sqrt(2) * 10 ** (db / 20)  # noqa: E731
    return (
        amp(low_db) * np.sin(2 * np.pi * low * detune * t)
        + amp(high_db) * np.sin(2 * np.pi * high * detune * t)
    ).astype(np.float32)


@pytest.mark.parametrize("rate", RATES)
def test_all_16_keys_in_noise_at_20_db_snr(rate: int) -> None:
    rng = np.random.default_rng(rate)
    det = DtmfDetector(rate)
    heard = ""
    for key in DTMF_FREQS:
        x = pad(dtmf_tone(key, rate, duration_s=0.1, level_dbfs=-10.0).read(rate // 10), rate)
        noise = rng.standard_normal(len(x)) * 10 ** ((-10.0 - 20.0) / 20)
        heard += detect((x + noise).astype(np.float32), rate, det=det)
    assert heard == "".join(DTMF_FREQS)


@pytest.mark.parametrize("rate", RATES)
def test_sequence_with_50_ms_tones_and_pauses(rate: int) -> None:
    x = pad(dtmf_digits("1234*#", rate, tone_s=0.05, gap_s=0.05), rate)
    assert detect(x, rate) == "1234*#"


@pytest.mark.parametrize("rate", RATES)
def test_short_bursts_rejected_40_ms_accepted_at_every_alignment(rate: int) -> None:
    # Slide the tone across the block grid: timing must hold for every phase of it.
    for shift in range(0, rate // 75, max(1, rate // 2000)):
        lead = 0.05 + shift / rate
        assert detect(pad(dual("5", rate, 0.020), rate, lead), rate) == ""
        assert detect(pad(dual("5", rate, 0.023), rate, lead), rate) == ""
        assert detect(pad(dual("5", rate, 0.040), rate, lead), rate) == "5"


@pytest.mark.parametrize("rate", RATES)
def test_10_ms_break_is_one_press_40_ms_pause_is_two(rate: int) -> None:
    def press_gap_press(gap_s: float) -> np.ndarray:
        gen = ToneGenerator(DTMF_FREQS["7"], rate, -10.0)
        a = gen.read(round(0.06 * rate))
        gen.read(round(gap_s * rate))
        b = gen.read(round(0.06 * rate))
        return pad(np.concatenate((a, np.zeros(round(gap_s * rate)), b)), rate)

    assert detect(press_gap_press(0.010), rate) == "7"
    assert detect(press_gap_press(0.040), rate) == "77"


@pytest.mark.parametrize("rate", RATES)
def test_twist_window(rate: int) -> None:
    # Low group may lead by up to 8 dB, the high group by up to 4 dB.
    assert detect(pad(dual("9", rate, 0.06, -10.0, -17.5), rate), rate) == "9"
    assert detect(pad(dual("9", rate, 0.06, -13.5, -10.0), rate), rate) == "9"
    assert detect(pad(dual("9", rate, 0.06, -10.0, -20.0), rate), rate) == ""
    assert detect(pad(dual("9", rate, 0.06, -16.0, -10.0), rate), rate) == ""


@pytest.mark.parametrize("rate", RATES)
def test_frequency_tolerance(rate: int) -> None:
    for detune in (0.985, 1.015):  # Q.24: must accept ±1.5 %
        assert detect(pad(dual("A", rate, 0.06, detune=detune), rate), rate) == "A"
    for detune in (0.965, 1.035):  # and reject ±3.5 %
        assert detect(pad(dual("A", rate, 0.06, detune=detune), rate), rate) == ""


@pytest.mark.parametrize("rate", RATES)
def test_level_threshold(rate: int) -> None:
    assert detect(pad(dual("0", rate, 0.06, -33.0, -33.0), rate), rate) == "0"
    assert detect(pad(dual("0", rate, 0.06, -45.0, -45.0), rate), rate) == ""


def test_survives_ulaw_and_any_framing() -> None:
    x = ulaw_decode_float(ulaw_encode_float(pad(dtmf_digits("159D", 8000, 0.05, 0.05), 8000)))
    assert detect(x, 8000) == "159D"
    rng = np.random.default_rng(5)
    det, heard, i = DtmfDetector(8000), "", 0
    while i < len(x):
        n = int(rng.integers(1, 400))
        heard += "".join(det.feed(x[i : i + n]))
        i += n
    assert heard == "159D"


def test_held_key_tracks_the_press() -> None:
    det = DtmfDetector(8000)
    det.feed(np.zeros(400, np.float32))
    assert det.feed(dual("#", 8000, 0.2)) == ["#"]
    assert det.held == "#"
    det.feed(np.zeros(800, np.float32))
    assert det.held is None


def music_like(rate: int, seconds: float) -> np.ndarray:
    """Chords of harmonic-rich notes (6 partials, plucked decay), changing every 0.5 s."""
    rng = np.random.default_rng(2)
    n_chord = rate // 2
    t = np.arange(n_chord) / rate
    out = []
    for _ in range(int(seconds * 2)):
        root = rng.integers(48, 72)
        notes = root + np.array([0, 4, 7, 12])[: rng.integers(3, 5)]
        chord = np.zeros(n_chord)
        for midi in notes:
            f0 = 440.0 * 2 ** ((midi - 69) / 12)
            for k in range(1, 7):
                if k * f0 < 0.45 * rate:
                    chord += np.sin(2 * np.pi * k * f0 * t) / k
        out.append(chord * np.exp(-2.5 * t))
    x = np.concatenate(out)
    return (0.25 * x / np.sqrt(np.mean(x**2))).astype(np.float32)


@pytest.mark.parametrize("rate", RATES)
def test_no_talk_off_on_speech_like_or_music(rate: int) -> None:
    assert detect(speech_like(rate, 12.0, seed=9, level_dbfs=-12.0), rate) == ""
    assert detect(music_like(rate, 10.0), rate) == ""


@pytest.mark.parametrize("rate", RATES)
def test_no_talk_off_on_synthetic_speech(rate: int, tmp_path: Path) -> None:
    espeak = require_binary("espeak-ng")  # fails in CI when missing, skips locally
    wav = tmp_path / "speech.wav"
    text = (
        "Unit four to dispatch, crossing the border at the north bridge. "
        "Request a patch to marine channel sixteen. Seven, three, niner, one, two, five. Over."
    )
    for voice in ("en", "en+f3"):
        subprocess.run([espeak, "-v", voice, "-w", str(wav), text], check=True)
        with wave.open(str(wav)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            src_rate = w.getframerate()
        x = soxr.resample(pcm.astype(np.float32) / 32768, src_rate, rate).astype(np.float32)
        x *= 10 ** (-12 / 20) / np.sqrt(np.mean(x**2))  # loud radio voice
        assert len(x) > 5 * rate
        assert detect(np.clip(x, -1, 1), rate) == ""
