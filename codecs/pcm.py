"""Conversions between the internal float32 format and 16-bit PCM, and level metering.

Every port converts at its edge, so these are the one place where clipping and
rounding rules live: a float that overshoots [-1, 1] must saturate, never wrap
around into a full-scale click of the opposite sign.
"""

from __future__ import annotations

import numpy as np

#: Level reported for digital silence; keeps meters and logs finite.
SILENCE_DBFS = -120.0

_INT16_SCALE = 32768.0


def float_to_int16(x: np.ndarray) -> np.ndarray:
    """Convert float audio to int16, saturating so overshoot cannot wrap around.

    Scaling by 32768 maps -1.0 exactly to -32768; +1.0 saturates at 32767.
    Rounding to nearest (not truncation) keeps the quantisation error
    zero-mean, so repeated conversions do not add a DC offset.
    """
    scaled = np.asarray(x, dtype=np.float64) * _INT16_SCALE
    return np.clip(np.rint(scaled), -32768, 32767).astype(np.int16)


def int16_to_float(x: np.ndarray) -> np.ndarray:
    """Convert int16 samples to float32 in [-1, 1) — the exact inverse of the scaling above."""
    return (np.asarray(x, dtype=np.int16).astype(np.float32)) / np.float32(_INT16_SCALE)


def _to_db(value: float) -> float:
    if not np.isfinite(value) or value <= 0.0:
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 20.0 * float(np.log10(value)))


def dbfs(x: np.ndarray) -> float:
    """RMS level of a frame in dBFS, referenced to a full-scale *square* wave.

    This is the plain 20·log10(rms) convention (AES17 would add 3.01 dB so a
    sine reads 0): a full-scale sine reads -3.01 dBFS, and a tone generated at
    ``level_dbfs=L`` by :mod:`.tones` measures L here. Silence (or an empty
    frame) reports :data:`SILENCE_DBFS` so callers never see ``-inf``.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return SILENCE_DBFS
    return _to_db(float(np.sqrt(np.mean(a * a))))


def peak_dbfs(x: np.ndarray) -> float:
    """Sample-peak level in dBFS (full scale = 0 dB); what a clip indicator needs."""
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return SILENCE_DBFS
    return _to_db(float(np.max(np.abs(a))))
