"""The SIP seam (gateway/sip/message.py): each message read once into a SipMessage.

Compact and odd-case header names, several Vias, repeated headers and bad input,
checked on the parser itself and, for bad input, on a live transport over loopback
(answered 400 and counted, never an exception)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.sip.message import MAX_HEADERS, MessageError, Source, parse
from gateway.sip.sdp import read_offer
from gateway.sip.transport import SipTransport

PEER = Source(("127.0.0.1", 5070), "tls", identity="peer.test")
SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
)


def invite(*lines: str, body: str = SDP) -> bytes:
    head = [
        "INVITE sips:6001@gw.test SIP/2.0",
        *lines,
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


WHOLE = (
    "Via: SIP/2.0/TLS 127.0.0.1:5070;branch=z9hG4bKa;rport",
    '"Alice" <sips:alice@site.test>;tag=a1'.join(("From: ", "")),
    "To: <sips:6001@gw.test>",
    "Call-ID: c1@site.test",
    "CSeq: 7 INVITE",
    "Contact: <sip:alice@127.0.0.1:5070;transport=tls>;expires=60",
    "Content-Type: application/sdp",
)


def test_a_whole_invite_is_read_into_fields() -> None:
    message = parse(invite(*WHOLE), PEER)
    assert (message.method, message.uri, message.status) == ("INVITE", "sips:6001@gw.test", 0)
    assert message.call_id == "c1@site.test" and (message.cseq, message.cseq_method) == (
        7,
        "INVITE",
    )
    assert message.sender.uri == "sips:alice@site.test" and message.sender.tag == "a1"
    assert message.sender.text == '"Alice" <sips:alice@site.test>'
    assert message.recipient.user == "6001" and message.recipient.tag == ""
    assert message.contact == "sip:alice@127.0.0.1:5070;transport=tls"
    assert message.content_type == "application/sdp" and message.body == SDP.encode()
    assert message.source.identity == "peer.test" and message.source.secure
    assert message.transaction == ("c1@site.test", 7, "INVITE")
    offer = read_offer(message)
    assert offer is not None and offer.payload_types == [8] and offer.dtmf_type == 101


def test_compact_names_and_any_case_are_the_full_headers() -> None:
    message = parse(
        invite(
            "v: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKa",
            "f: <sip:alice@site.test>;TAG=a1",
            "T: <sip:6001@gw.test>",
            "i: c2",
            "cSeQ: 1 invite",
            "m: <sip:alice@127.0.0.1:5070>",
            "C: APPLICATION/SDP; charset=utf-8",
            "Supported:",  # empty: skipped (baresip sends it)
        ),
        PEER,
    )
    assert message.call_id == "c2" and message.cseq_method == "INVITE"
    assert message.sender.tag == "a1" and message.contact == "sip:alice@127.0.0.1:5070"
    assert message.content_type == "application/sdp"
    for name in ("Call-ID", "call-id", "I", "i"):
        assert message.headers.get(name) == "c2"
    assert "supported" not in message.headers
    assert read_offer(message) is not None


def test_several_vias_on_one_line_and_repeated_headers_are_kept_in_order() -> None:
    message = parse(
        invite(
            "Via: SIP/2.0/UDP proxy.test;branch=z9hG4bK1, SIP/2.0/UDP edge.test;branch=z9hG4bK2",
            *WHOLE[1:],
            "v: SIP/2.0/TLS 127.0.0.1:5070;branch=z9hG4bK3",
            "Record-Route: <sip:proxy.test;lr>",
            "record-route: <sip:edge.test;lr>",
        ),
        PEER,
    )
    assert [via.split(";")[0] for via in message.vias] == [
        "SIP/2.0/UDP proxy.test",
        "SIP/2.0/UDP edge.test",
        "SIP/2.0/TLS 127.0.0.1:5070",
    ]
    assert message.headers.all("Record-Route") == ["<sip:proxy.test;lr>", "<sip:edge.test;lr>"]
    answer = SipTransport(lambda message: None).response(message, 200, "OK", to_tag="t9")
    copied = parse(answer, PEER)
    assert copied.status == 200 and copied.transaction == message.transaction
    assert copied.vias[0] == message.vias[0] + ";received=127.0.0.1"  # where it came from
    assert copied.vias[1:] == message.vias[1:] and copied.recipient.tag == "t9"


def test_a_response_is_read_with_its_status_and_reason() -> None:
    data = (
        b"SIP/2.0 401 Unauthorized\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKr\r\n"
        b"From: <sip:a@b>;tag=1\r\nTo: <sip:a@b>;tag=2\r\nCall-ID: r\r\nCSeq: 2 REGISTER\r\n"
        b'WWW-Authenticate: Digest realm="gw", nonce="n1"\r\nContent-Length: 0\r\n\r\n'
    )
    message = parse(data, PEER)
    assert message.is_response and (message.status, message.reason) == (401, "Unauthorized")
    assert message.headers.get("www-authenticate") == 'Digest realm="gw", nonce="n1"'


@pytest.mark.parametrize(
    ("lines", "body", "why"),
    [
        (("CSeq: 2147483648 INVITE",), SDP, "CSeq"),
        (("CSeq: one INVITE",), SDP, "CSeq"),
        (("From: alice",), SDP, "From has no SIP URI"),
        (("Call-ID: ",), SDP, "no Call-ID"),
        (("Bad Name: x",), SDP, "header line without a name"),
        (("X-Flood: y",) * MAX_HEADERS, SDP, "header lines"),
    ],
)
def test_bad_input_is_a_clear_error(lines: tuple[str, ...], body: str, why: str) -> None:
    replaced = {line.split(":")[0].lower() for line in lines}
    kept = [line for line in WHOLE if line.split(":")[0].lower() not in replaced]
    with pytest.raises(MessageError, match=why):
        parse(invite(*kept, *lines, body=body), PEER)


def test_content_length_past_the_body_or_twice_is_refused_and_a_shorter_one_cuts() -> None:
    whole = invite(*WHOLE)
    with pytest.raises(MessageError, match="runs past the body"):
        parse(whole.replace(b"Content-Length: ", b"Content-Length: 9"), PEER)
    with pytest.raises(MessageError, match="not one number"):
        parse(whole.replace(b"Content-Length: ", b"l: 0\r\nContent-Length: "), PEER)
    with pytest.raises(MessageError, match="no end of headers"):
        parse(whole.split(b"\r\n\r\n")[0], PEER)
    short = parse(whole.replace(b"Content-Length: %d" % len(SDP), b"Content-Length: 4"), PEER)
    assert short.body == b"v=0\r"


def test_the_transport_answers_bad_requests_400_and_counts_them() -> None:
    """A request with a transaction but a bad CSeq-range gets 400 with its headers
    copied; one without a Call-ID is dropped; both are counted, none is an error."""
    bad = invite(*WHOLE).replace(b"CSeq: 7", b"CSeq: 4294967296")
    nameless = invite(*WHOLE).replace(b"Call-ID: c1@site.test\r\n", b"")
    seen: list[str] = []
    transport = SipTransport(lambda message: seen.append(message.method))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(5)

        async def deliver() -> None:
            await transport.open("127.0.0.1", 0)
            try:
                for data in (bad, nameless):
                    peer.sendto(data, ("127.0.0.1", transport.port))
                    while transport.stats.received < (1 if data is bad else 2):
                        await asyncio.sleep(0.01)
            finally:
                transport.close()

        asyncio.run(asyncio.wait_for(deliver(), 10))
        answer = peer.recv(65535)
        peer.settimeout(0.2)
        with pytest.raises(TimeoutError):
            peer.recv(65535)
    assert answer.startswith(b"SIP/2.0 400 Bad Request\r\n")
    assert b"\r\nCall-ID: c1@site.test\r\n" in answer and b"\r\nCSeq: 4294967296 INVITE" in answer
    assert transport.stats.malformed == 2 and transport.stats.errors == 0 and seen == []
