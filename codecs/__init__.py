"""Audio formats: G.711, resampling, tones and CTCSS detection.

Imported as ``gateway.codecs`` (see pyproject's package-dir); depends on nothing of ours.
Everything speaks the internal format: float32 mono in [-1, 1].

pcm        float <-> int16 with saturation; dBFS metering
g711       µ-law / A-law, table-driven, bit-exact, any array shape
resample   StreamResampler (soxr, or low-latency sinc)
interp     the windowed-sinc kernels behind the low-latency paths
tones      phase-continuous tones, cadences, DTMF, speech-like test audio
goertzel   single-bin DFT bank behind the CTCSS detector
ctcss      CTCSS tones, squelch decoder, tone identifier, sub-audible filter

Import the submodules directly; this package imports nothing so that
``import gateway.codecs.g711`` does not pay for scipy.
"""
