"""The talker header extension: exact bytes, every rejection counted, never an exception."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.links.talker import (
    LABEL_EVERY,
    LABEL_REPEATS,
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

MARINE_7 = Talker(keyed=True, talker_id=7, keyed_at=0x01020304, priority=5, emergency=True,
                  squelch=False, label="RCMP · Marine 7")  # fmt: skip


def two_byte(*elements: tuple[int, bytes], profile: int = 0x1000) -> bytes:
    body = b"".join(bytes((number, len(data))) + data for number, data in elements)
    body += bytes(-len(body) % 4)
    return struct.pack("!HH", profile, len(body) // 4) + body


def one_byte(*elements: tuple[int, bytes]) -> bytes:
    body = b"".join(bytes((number << 4 | len(data) - 1,)) + data for number, data in elements)
    body += bytes(-len(body) % 4)
    return struct.pack("!HH", 0xBEDE, len(body) // 4) + body


def test_the_bytes_are_as_documented() -> None:
    label = "RCMP · Marine 7".encode()
    # keyed (0x20) | emergency (0x08) | priority 5; talker 7; key-up 0x01020304; label
    assert encode(MARINE_7) == two_byte((1, bytes((0x2D, 7, 1, 2, 3, 4)) + label))
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
        (two_byte((1, bytes((0x40, 1, 0, 0, 0, 0)))), "version"),
        (two_byte((1, bytes(6) + b"a" * (MAX_LABEL_BYTES + 1))), "label_too_long"),
        (two_byte((1, bytes(6) + b"\xff\xfe")), "label_text"),
        (two_byte((1, bytes(6) + b"Marine\x1b[2J")), "label_text"),  # terminal escape
        (two_byte((1, bytes(6) + "RCMP\u202eenir".encode())), "label_text"),  # bidi override
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
    assert decode(encode(Talker(keyed=True, label=long))).label == fitted  # type: ignore[union-attr]
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


def test_the_announcer_numbers_overs_and_repeats_the_label() -> None:
    announcer = Announcer()
    first = [announcer.stamp(True, 1000 + 20 * i, "RCMP · Marine 7") for i in range(120)]
    assert {t.talker_id for t in first} == {1} and {t.keyed_at for t in first} == {1000}
    with_label = [i for i, t in enumerate(first) if t.label]
    assert with_label == [*range(LABEL_REPEATS), LABEL_EVERY, 2 * LABEL_EVERY]
    released = announcer.stamp(False, 4000, "RCMP · Marine 7")
    assert (released.keyed, released.talker_id, released.label) == (False, 1, None)
    again = announcer.stamp(True, 5000, "RCMP · Marine 7", priority=2)
    assert (again.talker_id, again.keyed_at, again.label) == (2, 5000, "RCMP · Marine 7")
    handed = announcer.stamp(True, 5020, "CBSA · Patrol 3", priority=2)  # no gap between
    assert (handed.talker_id, handed.keyed_at, handed.label) == (3, 5020, "CBSA · Patrol 3")
    urgent = announcer.stamp(True, 5040, "CBSA · Patrol 3", priority=7, emergency=True)
    assert (urgent.talker_id, urgent.emergency, urgent.priority) == (3, True, 7)
    announcer.talker_id = 255
    announcer.stamp(False, 6000)
    assert announcer.stamp(True, 6020, "x").talker_id == 1  # 255 wraps to 1, never 0


def test_the_listener_knows_the_label_of_the_current_over_only() -> None:
    announcer, listener = Announcer(), Listener()
    heard = [listener.heard(decode(encode(announcer.stamp(True, 20 * i, "RCMP · Marine 7"))))
             for i in range(10)]  # fmt: skip
    assert all(t.label == "RCMP · Marine 7" for t in heard)  # incl. packets without it
    announcer.stamp(False, 400)
    first_of_next = announcer.stamp(True, 420, "CBSA · Patrol 3")
    # The next over's first packets are lost: its talker is known, its label not yet.
    lost = [announcer.stamp(True, 440 + 20 * i, "CBSA · Patrol 3") for i in range(2)]
    assert all(t.label for t in [first_of_next, *lost])
    later = listener.heard(announcer.stamp(True, 480, "CBSA · Patrol 3"))
    assert later.talker_id == 2 and later.label is None


def test_the_listener_decodes_only_when_the_bytes_change() -> None:
    announcer, listener = Announcer(), Listener(ext_id=3)
    blocks = [encode(announcer.stamp(True, 20 * i, "RCMP · Marine 7"), 3) for i in range(6)]
    assert blocks[3] == blocks[4] == blocks[5] != blocks[2]  # label only on the first three
    heard = [listener.read(block) for block in blocks]
    assert all(isinstance(t, Talker) and t.label == "RCMP · Marine 7" for t in heard)
    assert heard[4] is heard[3]  # reused, not decoded again
    bad = two_byte((3, bytes(6) + b"\xff"))
    assert listener.read(bad) == listener.read(bad) == Rejected("label_text")  # counted twice
    released = listener.read(encode(announcer.stamp(False, 200), 3))
    assert isinstance(released, Talker) and not released.keyed


talkers = st.builds(
    Talker,
    keyed=st.booleans(),
    talker_id=st.integers(0, 255),
    keyed_at=st.integers(0, 2**32 - 1),
    priority=st.integers(0, 7),
    emergency=st.booleans(),
    squelch=st.booleans(),
    label=st.none() | st.text(max_size=80).map(fit_label).map(lambda s: s or None),
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
    result = decode(block)
    assert isinstance(result, Talker | Rejected)
    if isinstance(result, Talker) and result.label:
        assert len(result.label.encode()) <= MAX_LABEL_BYTES
