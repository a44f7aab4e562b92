"""Opus in SDP at whatever dynamic payload type the offer gives it (RFC 7587, RFC 3264 §6.1)."""

from __future__ import annotations

from gateway.sip.message import Source, parse
from gateway.sip.rtp import OPUS, PCMU
from gateway.sip.sdp import choose_codec, describe, payload_type, read_offer

PEER = Source(("127.0.0.1", 5))


def offer(m_line: str, *attributes: str) -> bytes:
    body = (
        "\r\n".join(
            ["v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0", m_line]
            + list(attributes)
        )
        + "\r\n"
    )
    return (
        "INVITE sips:ship@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5;branch=z9hG4bKx\r\n"
        "From: <sip:ca@127.0.0.1>;tag=a\r\nTo: <sips:ship@127.0.0.1>\r\nCall-ID: c1\r\n"
        "CSeq: 1 INVITE\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def test_opus_is_recognised_at_any_dynamic_payload_type_and_answered_under_it():
    for number in (96, 111, 120, 127):
        found = read_offer(
            parse(
                offer(
                    f"m=audio 4000 RTP/AVP {number} 0",
                    f"a=rtpmap:{number} opus/48000/2",
                    "a=rtpmap:0 PCMU/8000",
                ),
                PEER,
            )
        )
        assert found is not None and found.payload_types == [OPUS, PCMU]
        codec = choose_codec(found, ["opus", "pcmu"])
        assert codec == OPUS and payload_type(found, codec) == number
        assert payload_type(found, PCMU) == PCMU
        answer = describe("127.0.0.1", 5000, [codec], None, opus_type=found.opus_type)
        assert f"m=audio 5000 RTP/AVP {number}\r\n" in answer
        assert f"a=rtpmap:{number} opus/48000/2" in answer and f"a=fmtp:{number} " in answer


def test_opus_at_a_static_number_or_another_clock_is_not_opus():
    found = read_offer(
        parse(
            offer(
                "m=audio 4000 RTP/AVP 8 97 98 0",
                "a=rtpmap:8 opus/48000/2",  # a static number: never Opus (and not taken at all)
                "a=rtpmap:97 opus/16000/1",  # not RFC 7587's clock
                "a=rtpmap:98 opus/48000/2",  # the first good one
                "a=rtpmap:0 PCMU/8000",
            ),
            PEER,
        )
    )
    assert found is not None and found.payload_types == [OPUS, PCMU] and found.opus_type == 98


def test_opus_is_agreed_only_with_a_peer_whose_packet_time_is_ours():
    # One packet a tick each way: a 10 ms gateway and a 20 ms one fall back to G.711
    # (any packet length plays), never to Opus packets the other side cannot play.
    def ptime_offer(*ptime: str):  # noqa: ANN202
        lines = ("a=rtpmap:111 opus/48000/2", "a=rtpmap:0 PCMU/8000", *ptime)
        return read_offer(parse(offer("m=audio 4000 RTP/AVP 111 0", *lines), PEER))

    assert choose_codec(ptime_offer(), ["opus", "pcmu"]) == OPUS  # no a=ptime: 20 ms
    assert choose_codec(ptime_offer(), ["opus", "pcmu"], ptime=10) == PCMU
    assert choose_codec(ptime_offer("a=ptime:10"), ["opus", "pcmu"], ptime=10) == OPUS
    assert choose_codec(ptime_offer("a=ptime:10"), ["opus", "pcmu"]) == PCMU
    assert choose_codec(ptime_offer("a=ptime:10"), ["opus"]) is None
    assert "a=ptime:10\r\n" in describe("127.0.0.1", 5000, [OPUS], None, ptime=10)
    assert "a=ptime:20\r\n" in describe("127.0.0.1", 5000, [PCMU], None)
