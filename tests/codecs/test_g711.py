"""G.711 must be bit-exact with the reference: every linear input and every code."""

import warnings

import numpy as np
import pytest
from gateway.codecs.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from gateway.codecs.pcm import dbfs, float_to_int16, int16_to_float

with warnings.catch_warnings():
    # stdlib on 3.11/3.12 (deprecated there), audioop-lts on >=3.13. No skip: a missing
    # reference must fail the run, not quietly drop the bit-exactness proof.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ALL_PCM = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)


def test_ulaw_encode_matches_reference_for_all_65536_inputs() -> None:
    ref = np.frombuffer(audioop.lin2ulaw(ALL_PCM.tobytes(), 2), dtype=np.uint8)
    assert np.array_equal(ulaw_encode(ALL_PCM), ref)


def test_alaw_encode_matches_reference_for_all_65536_inputs() -> None:
    ref = np.frombuffer(audioop.lin2alaw(ALL_PCM.tobytes(), 2), dtype=np.uint8)
    assert np.array_equal(alaw_encode(ALL_PCM), ref)


def test_ulaw_decode_matches_reference_for_all_256_codes() -> None:
    ref = np.frombuffer(audioop.ulaw2lin(ALL_CODES.tobytes(), 2), dtype=np.int16)
    out = ulaw_decode(ALL_CODES)
    assert out.dtype == np.int16
    assert np.array_equal(out, ref)


def test_alaw_decode_matches_reference_for_all_256_codes() -> None:
    ref = np.frombuffer(audioop.alaw2lin(ALL_CODES.tobytes(), 2), dtype=np.int16)
    out = alaw_decode(ALL_CODES)
    assert out.dtype == np.int16
    assert np.array_equal(out, ref)


def test_batch_of_streams_is_one_call_and_keeps_shape() -> None:
    rng = np.random.default_rng(1)
    batch = rng.integers(-32768, 32768, size=(4, 160)).astype(np.int16)
    codes = ulaw_encode(batch)
    assert codes.shape == (4, 160) and codes.dtype == np.uint8
    for row in range(4):
        assert np.array_equal(codes[row], ulaw_encode(batch[row]))
    assert alaw_decode(alaw_encode(batch)).shape == (4, 160)


def test_rtp_payload_bytes_decode_directly() -> None:
    payload = bytes(range(256))
    assert np.array_equal(ulaw_decode(payload), ulaw_decode(ALL_CODES))
    assert np.array_equal(alaw_decode(payload), alaw_decode(ALL_CODES))


def test_silence_codes() -> None:
    zeros = np.zeros(4, np.int16)
    assert ulaw_encode(zeros).tolist() == [0xFF] * 4
    assert alaw_encode(zeros).tolist() == [0xD5] * 4


def test_wide_ints_saturate_and_floats_are_refused() -> None:
    wide = np.array([70000, -70000], dtype=np.int32)
    assert np.array_equal(ulaw_encode(wide), ulaw_encode(np.array([32767, -32768], np.int16)))
    with pytest.raises(TypeError):
        ulaw_encode(np.zeros(3, np.float32))


@pytest.mark.parametrize(("enc", "dec"), [(ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)])
def test_float_roundtrip_keeps_a_tone_with_about_38_db_snr(enc, dec) -> None:
    t = np.arange(8000) / 8000.0
    x = (0.5 * np.sin(2 * np.pi * 1004 * t)).astype(np.float32)
    y = int16_to_float(dec(enc(float_to_int16(x))))
    assert y.dtype == np.float32
    snr = dbfs(x) - dbfs(y - x)
    assert snr > 35.0  # G.711 gives ~38 dB SQNR over its companded range
    assert abs(dbfs(y) - dbfs(x)) < 0.1
