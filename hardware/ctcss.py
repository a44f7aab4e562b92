"""CTCSS for the radio port: tone squelch decode and the filter that hides the tone.

Both come from ``gateway.codecs.ctcss`` (EIA tones, voice on top, hysteresis; a
6th-order elliptic high-pass ≥ 40 dB down below 266 Hz); this module only gives
the radio port the two calls it makes, so squelch code reads in radio words.
"""

from __future__ import annotations

from gateway.codecs.ctcss import CtcssDetector, SubAudibleFilter

__all__ = ["SubAudibleFilter", "make_detector", "make_filter"]


def make_detector(rate: int, tone_hz: float) -> CtcssDetector:
    """Tone squelch: True while ``tone_hz`` rides under the received audio."""
    return CtcssDetector(rate, tone_hz)


def make_filter(rate: int) -> SubAudibleFilter:
    """High-pass for received audio, so a repeater's tone is not heard on the patch."""
    return SubAudibleFilter(rate)
