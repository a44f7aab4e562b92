"""Stream framing as a property (hypothesis, bounded): however a stream of SIP messages is
cut into reads, the same messages come out; whatever bytes come in, the framer either
returns messages or says the stream is unreadable — nothing else, and never a buffer
beyond its caps."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.sip.stream import Framer, FramingError

MAX_MESSAGE, MAX_HEADER = 4096, 1024


def message(n: int, body: bytes) -> bytes:
    return (
        f"MESSAGE sip:x@127.0.0.1 SIP/2.0\r\nCSeq: {n} MESSAGE\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


bodies = st.lists(st.binary(max_size=200), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies, st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50))
def test_any_split_gives_back_the_same_messages(body_list, cuts):
    sent = [message(n, body) for n, body in enumerate(body_list)]
    stream = b"\r\n\r\n".join(sent)  # keepalive pings between messages
    framer = Framer(MAX_MESSAGE, MAX_HEADER)
    out: list[bytes] = []
    position, i = 0, 0
    while position < len(stream):
        size = cuts[i % len(cuts)]
        out += framer.feed(stream[position : position + size])
        position += size
        i += 1
    assert [m for m in out if m] == sent
    assert out.count(b"") == len(sent) - 1  # one pong per ping
    assert not framer.pending


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=600), max_size=20))
def test_garbage_gives_messages_or_a_framing_error_and_stays_bounded(chunks):
    framer = Framer(MAX_MESSAGE, MAX_HEADER)
    try:
        for chunk in chunks:
            for out in framer.feed(chunk):
                assert len(out) <= MAX_MESSAGE
            # What is held is at most one message's worth (and one read).
            assert len(framer.buffer) <= MAX_MESSAGE + len(chunk)
    except FramingError:
        pass
