"""Sub-audible tones on received audio: CTCSS decode for squelch, and the filter that hides them.

The codecs package is to bring its own CTCSS detector; until it does, this small
one is used (``make_detector`` prefers the codecs one when it exists, so the radio
port need not change).

Decoder: the tone's level over the last ``window`` seconds, measured with a
Hann-windowed single-bin DFT (one dot product per tick), must exceed
``min_level_dbfs`` and stand ``margin_db`` above the bins 5 % either side — so a
radio hearing another group's tone, or speech with low-frequency energy, stays shut.
EIA tones are ~3.5 % apart; at the default 0.3 s window the decoder separates tones
two steps apart reliably, adjacent ones not always (a real radio's decoder is the
better place for tight tone plans). Detection takes about one window.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

SUBAUDIBLE_EDGE_HZ = 300.0


class ToneDecoder:
    """True while ``tone_hz`` is present in the received audio."""

    def __init__(self, rate: int, tone_hz: float, window: float = 0.3,
                 min_level_dbfs: float = -50.0, margin_db: float = 10.0) -> None:  # fmt: skip
        if not 30.0 <= tone_hz <= 300.0:
            raise ValueError(f"CTCSS tone must be 30–300 Hz, not {tone_hz:g}")
        self.rate, self.tone_hz = rate, tone_hz
        n = round(window * rate)
        t = np.arange(n) / rate
        hann = np.hanning(n)
        norm = 2.0 / hann.sum()  # amplitude of a sine from its windowed bin
        self.bins = np.stack([norm * hann * np.exp(-2j * np.pi * f * t)
                              for f in (tone_hz, tone_hz * 1.05, tone_hz / 1.05)])  # fmt: skip
        self.history = np.zeros(n, np.float32)
        self.min_amp = 10 ** (min_level_dbfs / 20) * np.sqrt(2)
        self.margin = 10 ** (margin_db / 20)

    def feed(self, frame: np.ndarray) -> bool:
        n = len(frame)
        self.history = np.concatenate((self.history[n:], frame.astype(np.float32)))
        amps = np.abs(self.bins @ self.history)
        return bool(amps[0] > self.min_amp and amps[0] > self.margin * max(amps[1], amps[2]))


class SubAudibleFilter:
    """High-pass at 300 Hz: takes CTCSS/DCS and rumble out of received audio (streaming)."""

    def __init__(self, rate: int, edge_hz: float = SUBAUDIBLE_EDGE_HZ) -> None:
        self.sos = signal.butter(6, edge_hz, "highpass", fs=rate, output="sos")
        self.zi = np.zeros((self.sos.shape[0], 2))

    def process(self, frame: np.ndarray) -> np.ndarray:
        out, self.zi = signal.sosfilt(self.sos, frame, zi=self.zi)
        return out.astype(np.float32)


def make_detector(rate: int, tone_hz: float) -> ToneDecoder:
    """The codecs package's CTCSS detector when it exists, else :class:`ToneDecoder`."""
    try:
        from gateway.codecs.ctcss import CtcssDetector  # type: ignore[import-not-found]
    except ImportError:
        return ToneDecoder(rate, tone_hz)
    return CtcssDetector(rate, tone_hz)


def make_filter(rate: int) -> SubAudibleFilter:
    """The received-audio high-pass (ours: the codecs one's interface is not settled yet)."""
    return SubAudibleFilter(rate)
