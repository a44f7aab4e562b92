"""Audio formats: G.711, L16, resampling, tones, DTMF and CTCSS detection.

Imported as ``gateway.codecs`` (see pyproject's package-dir); depends on nothing of ours.
Everything speaks the internal format: float32 mono in [-1, 1].

pcm        float <-> int16 with saturation; dBFS metering
g711       µ-law / A-law, table-driven, bit-exact, any array shape
l16        RFC 3551 big-endian PCM
resample   StreamResampler (soxr, or low-latency sinc), DriftResampler
interp     the windowed-sinc kernels behind the low-latency paths
tones      phase-continuous tones, cadences, DTMF, speech-like test audio
goertzel   single-bin DFT bank shared by the detectors
dtmf       streaming DTMF detector (Q.24 timing, talk-off guards)
ctcss      CTCSS tones, squelch decoder, tone identifier, sub-audible filter

Import the submodules directly; this package imports nothing so that
``import gateway.codecs.g711`` does not pay for scipy.
"""
