"""L16 is big-endian on the wire regardless of host, and refuses half samples."""

import numpy as np
import pytest
from gateway.codecs.l16 import l16_decode, l16_encode


def test_wire_format_is_big_endian() -> None:
    x = np.array([0.5, -1.0, 2.0, 1.0 / 32768], dtype=np.float32)
    assert l16_encode(x) == bytes([0x40, 0x00, 0x80, 0x00, 0x7F, 0xFF, 0x00, 0x01])


def test_decode_known_bytes() -> None:
    y = l16_decode(b"\x40\x00\xc0\x00\x00\x00")
    assert y.dtype == np.float32
    assert y.tolist() == [0.5, -0.5, 0.0]


def test_roundtrip_of_a_tone_is_within_half_an_lsb() -> None:
    t = np.arange(320) / 16000.0
    x = (0.7 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    payload = l16_encode(x)
    assert len(payload) == 640
    assert np.max(np.abs(l16_decode(payload) - x)) <= 0.5 / 32768 + 1e-9


def test_odd_byte_count_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="whole 16-bit samples"):
        l16_decode(b"\x00\x01\x02")


def test_accepts_bytearray_and_memoryview() -> None:
    data = bytearray(b"\x7f\xff")
    assert l16_decode(data).tolist() == l16_decode(memoryview(data)).tolist() == [32767 / 32768]
