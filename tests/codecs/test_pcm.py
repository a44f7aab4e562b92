"""PCM conversion and metering: saturation instead of wrap-around, and levels of known signals."""

import numpy as np
import pytest
from gateway.codecs.pcm import SILENCE_DBFS, dbfs, float_to_int16, int16_to_float, peak_dbfs


def test_overshoot_saturates_instead_of_wrapping() -> None:
    x = np.array([1.5, 1.0, 0.99999, -1.0, -1.5, 1e9, -1e9], dtype=np.float32)
    y = float_to_int16(x)
    assert y.dtype == np.int16
    assert y.tolist() == [32767, 32767, 32767, -32768, -32768, 32767, -32768]


def test_rounds_to_nearest() -> None:
    x = np.array([0.4, 0.6, -0.4, -0.6], dtype=np.float64) / 32768.0
    assert float_to_int16(x).tolist() == [0, 1, 0, -1]


def test_int16_roundtrip_is_exact_for_every_value() -> None:
    allv = np.arange(-32768, 32768, dtype=np.int16)
    f = int16_to_float(allv)
    assert f.dtype == np.float32
    assert f.min() == -1.0 and f.max() < 1.0
    assert np.array_equal(float_to_int16(f), allv)


def test_keeps_shape() -> None:
    x = np.zeros((3, 160), dtype=np.float32)
    assert float_to_int16(x).shape == (3, 160)


def test_levels_of_known_signals() -> None:
    t = np.arange(16000) / 16000.0
    sine = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    assert dbfs(sine) == pytest.approx(-3.01, abs=0.01)
    assert peak_dbfs(sine) == pytest.approx(0.0, abs=0.01)
    assert dbfs(0.1 * sine) == pytest.approx(-23.01, abs=0.01)
    square = np.sign(sine + 1e-9).astype(np.float32)
    assert dbfs(square) == pytest.approx(0.0, abs=0.01)


def test_silence_has_a_finite_floor() -> None:
    assert dbfs(np.zeros(160, np.float32)) == SILENCE_DBFS
    assert peak_dbfs(np.zeros(160, np.float32)) == SILENCE_DBFS
    assert dbfs(np.zeros(0, np.float32)) == SILENCE_DBFS
    assert dbfs(np.full(160, 1e-9, np.float32)) == SILENCE_DBFS
