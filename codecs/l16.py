"""L16 (RFC 3551 §4.5.11): 16-bit signed PCM in network byte order.

Used on the RTP/multicast trunk between gateways where bandwidth is cheap and
a second companding stage would only add noise. The byte order is fixed by the
RFC, not by the host, hence the explicit ``>i2`` dtype.
"""

from __future__ import annotations

import numpy as np

from .pcm import float_to_int16, int16_to_float

_BE_INT16 = np.dtype(">i2")


def l16_encode(x: np.ndarray) -> bytes:
    """Encode float32 mono audio to an L16 payload (saturating, big-endian)."""
    return float_to_int16(np.ravel(x)).astype(_BE_INT16).tobytes()


def l16_decode(payload: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode an L16 payload to float32; a truncated packet is an error, not a shifted stream."""
    if len(payload) % 2:
        raise ValueError(f"L16 payload must hold whole 16-bit samples, got {len(payload)} bytes")
    return int16_to_float(np.frombuffer(payload, dtype=_BE_INT16).astype(np.int16))
