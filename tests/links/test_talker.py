"""The talker header extension: exact bytes, every rejection counted, never an exception;
and the label message that names an over in the link dialog (gateway.links.labels)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.links import labels
from gateway.links.labels import CONTENT_TYPE, Budget, Named
from gateway.links.talker import (
    MAX_LABEL_BYTES,
    Announcer,
    Listener,
    Rejected,
    Talker,
    attach,
    decode,
    encode,
    extension_block,
    fit_label,
    read,
    unwrap_ms,
    wire_priority,
)
from gateway.sip.rtp import build_header, parse_rtp

MARINE_7 = Talker(
    keyed=True, talker_id=7, keyed_at=0x01020304, priority=5, emergency=True, squelch=False
)


def two_byte(*elements: tuple[int, bytes], profile: int = 0x1000) -> bytes:
    body = b"".join(bytes((number, len(data))) + data for number, data in elements)
    body += bytes(-len(body) % 4)
    return struct.pack("!HH", profile, len(body) // 4) + body


def one_byte(*elements: tuple[int, bytes]) -> bytes:
    body = b"".join(bytes((number << 4 | len(data) - 1,)) + data for number, data in elements)
    body += bytes(-len(body) % 4)
    return struct.pack("!HH", 0xBEDE, len(body) // 4) + body


def test_the_bytes_are_as_documented() -> None:
    # keyed (0x20) | emergency (0x08) | priority 5; talker 7; key-up 0x01020304; no label
    assert encode(MARINE_7) == two_byte((1, bytes((0x2D, 7, 1, 2, 3, 4))))
    assert decode(encode(MARINE_7)) == MARINE_7
    quiet = Talker(keyed=False, talker_id=7, keyed_at=5, squelch=True)
    assert encode(quiet, ext_id=9) == two_byte((9, bytes((0x10, 7, 0, 0, 0, 5))))
    assert decode(encode(quiet, ext_id=9), ext_id=9) == quiet


def test_the_one_byte_form_is_read_too_and_other_elements_are_skipped() -> None:
    fixed = bytes((0x23, 4, 0, 0, 1, 0))  # keyed, priority 3, talker 4, key-up 256
    block = one_byte((2, b"\x80"), (1, fixed), (5, b"abcd"))
    assert decode(block) == Talker(keyed=True, talker_id=4, keyed_at=256, priority=3)
    assert decode(two_byte((3, b""), (1, fixed), (200, b"x" * 100))) == decode(block)


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        (b"\x10\x00", "truncated"),
        (struct.pack("!HH", 0x1000, 2) + bytes(4), "truncated"),  # says 8 bytes, has 4
        (two_byte((1, bytes(6)), profile=0xABCD), "profile"),
        (struct.pack("!HH", 0x1000, 1) + bytes((1, 9, 0, 0)), "element"),  # runs past the end
        (struct.pack("!HH", 0xBEDE, 1) + bytes((0x1F, 0, 0, 0)), "element"),
        (struct.pack("!HH", 0x1000, 1) + bytes(4), "absent"),  # padding only
        (struct.pack("!HH", 0x1000, 0), "absent"),
        (two_byte((2, bytes(6)), (3, b"")), "unknown_id"),
        (one_byte((15, bytes(6)), (1, bytes(6))), "absent"),  # ID 15: stop reading
        (two_byte((1, bytes(6)), (1, bytes(6))), "duplicate_id"),
        (two_byte((1, bytes(5))), "element"),  # shorter than the fixed part
        (two_byte((1, bytes(6) + b"RCMP")), "element"),  # longer: a label has no place here
        (two_byte((1, bytes((0x40, 1, 0, 0, 0, 0)))), "version"),
    ],
)
def test_bad_extensions_are_rejected_with_a_reason(block: bytes, reason: str) -> None:
    assert decode(block) == Rejected(reason)  # type: ignore[arg-type]


def rtp(payload: bytes = b"\xff" * 160, csrcs: int = 0) -> bytes:
    header = bytearray(build_header(0, False, 1234, 5678, 0xCAFE))
    header[0] |= csrcs
    return bytes(header) + bytes(4 * csrcs) + payload


@pytest.mark.parametrize("csrcs", [0, 2])
def test_attached_to_an_rtp_packet_it_reads_back_and_leaves_the_audio(csrcs: int) -> None:
    packet = attach(rtp(csrcs=csrcs), encode(MARINE_7))
    assert read(packet) == MARINE_7
    parsed = parse_rtp(packet)  # the SIP stack's parser still finds the audio
    assert parsed is not None and bytes(parsed.payload) == b"\xff" * 160
    assert read(rtp(csrcs=csrcs)) is None  # no extension: a plain BSI-Core peer
    with pytest.raises(ValueError):
        attach(packet, encode(MARINE_7))


def test_bad_packets_are_rejected_not_raised() -> None:
    packet = attach(rtp(), encode(MARINE_7))
    assert read(b"\x80\x00") == Rejected("rtp")
    assert read(b"\x40" + packet[1:]) == Rejected("rtp")  # RTP version 1
    assert read(packet[:14]) == Rejected("truncated")
    assert extension_block(packet[:20]) == Rejected("truncated")
    assert read(packet, ext_id=2) == Rejected("unknown_id")


def test_labels_are_fitted_on_the_way_out() -> None:
    assert fit_label("RCMP\n· Marine 7\x00") == "RCMP· Marine 7"
    long = "Ω" * 40  # 80 bytes of UTF-8
    fitted = fit_label(long)
    assert fitted == "Ω" * 32 and len(fitted.encode()) == MAX_LABEL_BYTES
    assert wire_priority(100) == 7 and wire_priority(-3) == 0 and wire_priority(4) == 4
    with pytest.raises(ValueError):
        Talker(keyed=True, priority=8)
    with pytest.raises(ValueError):
        encode(MARINE_7, ext_id=0)


def test_key_up_times_unwrap_across_the_32_bit_edge() -> None:
    now = (5 << 32) + 10  # just after a wrap
    assert unwrap_ms((now - 30) & 0xFFFFFFFF, now) == now - 30  # stamped just before it
    assert unwrap_ms((now + 20) & 0xFFFFFFFF, now) == now + 20  # peer clock slightly ahead
    assert unwrap_ms(now & 0xFFFFFFFF, now + 1000) == now


def test_the_announcer_numbers_overs() -> None:
    announcer = Announcer()
    first = [announcer.stamp(True, 1000 + 20 * i, "RCMP · Marine 7") for i in range(120)]
    assert {t.talker_id for t in first} == {1} and {t.keyed_at for t in first} == {1000}
    assert len({encode(t) for t in first}) == 1  # the same block all over long
    assert announcer.label == "RCMP · Marine 7"
    released = announcer.stamp(False, 4000, "RCMP · Marine 7")
    assert (released.keyed, released.talker_id) == (False, 1)
    again = announcer.stamp(True, 5000, "RCMP · Marine 7", priority=2)
    assert (again.talker_id, again.keyed_at) == (2, 5000)
    handed = announcer.stamp(True, 5020, "CBSA · Patrol 3", priority=2)  # no gap between
    assert (handed.talker_id, handed.keyed_at, announcer.label) == (3, 5020, "CBSA · Patrol 3")
    urgent = announcer.stamp(True, 5040, "CBSA · Patrol 3", priority=7, emergency=True)
    assert (urgent.talker_id, urgent.emergency, urgent.priority) == (3, True, 7)
    announcer.talker_id = 255
    announcer.stamp(False, 6000)
    assert announcer.stamp(True, 6020, "x").talker_id == 1  # 255 wraps to 1, never 0


def test_the_listener_decodes_only_when_the_bytes_change() -> None:
    announcer, listener = Announcer(), Listener(ext_id=3)
    blocks = [encode(announcer.stamp(True, 20 * i, "RCMP · Marine 7"), 3) for i in range(6)]
    heard = [listener.read(block) for block in blocks]
    assert all(isinstance(t, Talker) and t.keyed and t.talker_id == 1 for t in heard)
    assert heard[4] is heard[3]  # reused, not decoded again
    bad = two_byte((3, bytes(5)))
    assert listener.read(bad) == listener.read(bad) == Rejected("element")  # counted twice
    released = listener.read(encode(announcer.stamp(False, 200), 3))
    assert isinstance(released, Talker) and not released.keyed


# --- the label, in the dialog ------------------------------------------------------------


def test_a_label_message_reads_back() -> None:
    named = Named(7, 0x01020304, "RCMP · Marine 7")
    text = labels.body(named)
    assert text == "talker-id=7\r\nkey-up=16909060\r\nlabel=RCMP · Marine 7\r\n"
    assert labels.read(CONTENT_TYPE, text.encode()) == named
    assert labels.read("Application/BorderLink-Talker; x=1", text.encode()) == named
    assert labels.read(CONTENT_TYPE, b"key-up=1\r\nlabel=a=b\r\ntalker-id=255") == Named(
        255, 1, "a=b"
    )


@pytest.mark.parametrize(
    ("content_type", "data", "reason"),
    [
        ("application/sdp", b"talker-id=7\r\nkey-up=1\r\nlabel=x", "info"),
        (CONTENT_TYPE, b"talker-id=0\r\nkey-up=1\r\nlabel=x", "info"),  # IDs are 1-255
        (CONTENT_TYPE, b"talker-id=256\r\nkey-up=1\r\nlabel=x", "info"),
        (CONTENT_TYPE, b"talker-id=7\r\nkey-up=4294967296\r\nlabel=x", "info"),  # 2^32
        (CONTENT_TYPE, b"talker-id=7\r\nlabel=x", "info"),  # no key-up
        (CONTENT_TYPE, b"talker-id=-7\r\nkey-up=1\r\nlabel=x", "info"),
        (CONTENT_TYPE, b"talker-id=7\r\ntalker-id=8\r\nkey-up=1\r\nlabel=x", "info"),
        (CONTENT_TYPE, b"talker-id=7\r\nkey-up=1\r\nnonsense\r\nlabel=x", "info"),
        (CONTENT_TYPE, b"talker-id=7\r\nkey-up=1\r\nlabel=" + b"x" * 300, "info"),  # body cap
        (CONTENT_TYPE, b"talker-id=7\r\nkey-up=1\r\nlabel=" + b"R" * 65, "label_too_long"),
        (CONTENT_TYPE, b"talker-id=7\r\nkey-up=1\r\nlabel=Mar\x1b[2Jine", "label_text"),
        (CONTENT_TYPE, "talker-id=7\r\nkey-up=1\r\nlabel=RCMP\u202eenir".encode(), "label_text"),
        (CONTENT_TYPE, b"talker-id=7\r\nkey-up=1\r\nlabel=\xff\xfe", "label_text"),
        (CONTENT_TYPE, b"talker-id=7\r\nkey-up=1\r\nlabel=", "label_text"),  # empty
    ],
)
def test_bad_label_messages_are_rejected_with_a_reason(
    content_type: str, data: bytes, reason: str
) -> None:
    assert labels.read(content_type, data) == Rejected(reason)  # type: ignore[arg-type]


def test_the_label_budget_lets_a_burst_through_then_the_rate() -> None:
    budget = Budget(rate=0.001, burst=5)  # (practically) no refill during the test
    assert [budget.take() for _ in range(8)] == [True] * 5 + [False] * 3


@settings(max_examples=300, deadline=None)
@given(content_type=st.sampled_from([CONTENT_TYPE, "text/plain"]), data=st.binary(max_size=300))
def test_property_label_messages_never_raise(content_type: str, data: bytes) -> None:
    result = labels.read(content_type, data)
    assert isinstance(result, Named | Rejected)
    if isinstance(result, Named):
        assert 1 <= result.talker_id <= 255 and len(result.label.encode()) <= MAX_LABEL_BYTES


talkers = st.builds(
    Talker,
    keyed=st.booleans(),
    talker_id=st.integers(0, 255),
    keyed_at=st.integers(0, 2**32 - 1),
    priority=st.integers(0, 7),
    emergency=st.booleans(),
    squelch=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(talker=talkers, ext_id=st.integers(1, 255))
def test_property_encode_then_decode_round_trips(talker: Talker, ext_id: int) -> None:
    block = encode(talker, ext_id)
    assert len(block) % 4 == 0
    assert decode(block, ext_id) == talker
    assert read(attach(rtp(), block), ext_id) == talker


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300), ext_id=st.integers(0, 300))
def test_property_decode_never_raises_on_arbitrary_bytes(data: bytes, ext_id: int) -> None:
    for result in (decode(data, ext_id), read(data, ext_id), read(rtp()[:12] + data, ext_id)):
        assert result is None or isinstance(result, Talker | Rejected)


@settings(max_examples=300, deadline=None)
@given(
    elements=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=80)), max_size=6),
    profile=st.sampled_from([0x1000, 0x1003, 0xBEDE]),
)
def test_property_well_framed_garbage_elements_never_raise(
    elements: list[tuple[int, bytes]], profile: int
) -> None:
    block = two_byte(*elements, profile=profile)
    assert isinstance(decode(block), Talker | Rejected)
