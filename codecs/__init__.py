"""Audio formats: G.711, L16, resampling, tones, DTMF and CTCSS detection.

Imported as ``gateway.codecs`` (see pyproject's package-dir); depends on nothing of ours.
"""
