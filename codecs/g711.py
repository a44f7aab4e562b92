"""G.711 µ-law and A-law, bit-exact with the ITU reference, as table look-ups.

Every SIP leg encodes and decodes on every tick, so the per-sample work must
be a single NumPy gather: the tables below are computed once at import with
the reference (Sun/ITU ``g711.c``) segment arithmetic, vectorised, and then
indexed with whatever array shape the caller has — one frame, or a whole
batch of streams ``(n_streams, n_samples)`` in one call.
"""

from __future__ import annotations

import numpy as np

_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159


def _build_ulaw_encode() -> np.ndarray:
    # Index i is the int16 value whose bit pattern, read as uint16, equals i.
    pcm = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left")
    code = (np.minimum(seg, 7) << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _build_ulaw_decode() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def _build_alaw_encode() -> np.ndarray:
    pcm = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32) >> 3
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    mag = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")
    shift = np.where(seg < 2, 1, np.minimum(seg, 7))
    code = (np.minimum(seg, 7) << 4) | ((mag >> shift) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _build_alaw_decode() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ULAW_ENC = _build_ulaw_encode()
_ULAW_DEC = _build_ulaw_decode()
_ALAW_ENC = _build_alaw_encode()
_ALAW_DEC = _build_alaw_decode()


def _as_int16(x: np.ndarray) -> np.ndarray:
    """Accept any integer array; saturate wider types instead of letting them wrap."""
    a = np.asarray(x)
    if a.dtype == np.int16:
        return a
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"G.711 encodes integer PCM, got {a.dtype}; use the *_float variant")
    return np.clip(a, -32768, 32767).astype(np.int16)


def _as_codes(codes: np.ndarray | bytes) -> np.ndarray:
    """Let callers pass an RTP payload (bytes) straight through."""
    if isinstance(codes, bytes | bytearray | memoryview):
        return np.frombuffer(codes, dtype=np.uint8)
    return np.asarray(codes, dtype=np.uint8)


def ulaw_encode(x: np.ndarray) -> np.ndarray:
    """Encode int16 PCM to µ-law codes (uint8), same shape as the input."""
    return _ULAW_ENC[_as_int16(x).view(np.uint16)]


def ulaw_decode(codes: np.ndarray | bytes) -> np.ndarray:
    """Decode µ-law codes (uint8 array or bytes) to int16 PCM."""
    return _ULAW_DEC[_as_codes(codes)]


def alaw_encode(x: np.ndarray) -> np.ndarray:
    """Encode int16 PCM to A-law codes (uint8), same shape as the input."""
    return _ALAW_ENC[_as_int16(x).view(np.uint16)]


def alaw_decode(codes: np.ndarray | bytes) -> np.ndarray:
    """Decode A-law codes (uint8 array or bytes) to int16 PCM."""
    return _ALAW_DEC[_as_codes(codes)]
