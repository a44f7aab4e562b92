"""Property-based tests of every parser that reads bytes from the network (hypothesis,
bounded): whatever arrives, they answer a value or None — never an exception — and what
they accept is consistent. The live gateway under a million such messages is
bench/fuzz_sip.py; these run in seconds in every suite run."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.sip.message import MessageError, SipMessage, Source, parse
from gateway.sip.rtcp import parse_compound
from gateway.sip.rtp import parse_event, parse_rtp
from gateway.sip.sdp import read_offer
from gateway.sip.transport import SipTransport

BODY = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=ssrc:12345 cname:x\r\na=ptime:20\r\n"
)
HEAD = (
    "{method} sip:6001@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;rport\r\n"
    "From: <sip:alice@127.0.0.1>;tag=a1\r\nTo: <sip:6001@127.0.0.1>\r\n"
    "Call-ID: c1@127.0.0.1\r\nCSeq: 1 {method}\r\nMax-Forwards: 70\r\n"
    "Contact: <sip:alice@127.0.0.1:5070>\r\n"
)
MESSAGES = [
    (
        HEAD.format(method="INVITE") + "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n{BODY}"
    ).encode(),
    (HEAD.format(method="BYE") + "Content-Length: 0\r\n\r\n").encode(),
    (
        HEAD.format(method="OPTIONS") + "Accept: application/sdp\r\nContent-Length: 0\r\n\r\n"
    ).encode(),
    b"SIP/2.0 200 OK\r\n"
    + HEAD.format(method="INVITE").split("\r\n", 1)[1].encode()
    + b"Content-Length: 0\r\n\r\n",
]

PEER = Source(("127.0.0.1", 5070))

SETTINGS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def mutated(draw) -> bytes:
    """A real INVITE/BYE/OPTIONS/200 with a few mutations a fuzzer (or a bad peer) makes."""
    data = bytearray(draw(st.sampled_from(MESSAGES)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["cut", "insert", "flip", "case", "length", "flood", "line"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "case":
            data = bytearray(data.swapcase() if draw(st.booleans()) else data.upper())
        elif kind == "length":
            value = draw(st.one_of(st.integers(-(10**20), 10**20), st.text(max_size=8)))
            data = bytearray(
                bytes(data).replace(
                    b"Content-Length: ", f"Content-Length: {value}".encode()[:60], 1
                )
            )
        elif kind == "flood":
            line = draw(st.sampled_from([b"Via: SIP/2.0/UDP x;branch=z9hG4bKf\r\n", b"X: y\r\n"]))
            data[at:at] = line * draw(st.integers(1, 300))
        elif kind == "line":
            data[: data.find(b"\r\n")] = draw(
                st.sampled_from([b"INVITE", b"INVITE  SIP/2.0", b"\x00\xff", b"SIP/2.0 abc", b""])
            )
    return bytes(data)


@SETTINGS
@given(st.one_of(mutated(), st.binary(max_size=600)))
def test_sip_parsers_never_raise_and_what_they_accept_is_whole(data: bytes) -> None:
    """The seam answers a message or a MessageError, nothing else; what it accepts has
    every field the call logic reads."""
    try:
        message = parse(data, PEER)
    except MessageError as error:
        assert str(error)  # a reason, for the log
        error.headers.transaction()
        return
    assert isinstance(message, SipMessage) and message.call_id and message.vias
    assert 0 <= message.cseq < 1 << 31 and message.cseq_method.isalpha()
    assert message.sender.uri[:3].lower() == "sip" and message.recipient.uri[:3].lower() == "sip"
    assert message.transaction == message.headers.transaction()
    assert (message.method == "") == message.is_response
    assert len(message.body) <= len(data)
    offer = read_offer(message)
    if offer is not None:
        assert isinstance(offer.port, int) and isinstance(offer.ssrcs, tuple)
        assert all(0 <= s < 1 << 32 for s in offer.ssrcs)


def test_upper_case_media_type_and_compact_names_are_read_as_sdp() -> None:
    shouted = MESSAGES[0].replace(b"Content-Type: application/sdp", b"c: APPLICATION/SDP")
    shouted = shouted.replace(b"Call-ID:", b"i:").replace(b"CSeq:", b"CSEQ:")
    offer = read_offer(parse(shouted, PEER))
    assert offer is not None and offer.port == 4000 and offer.ssrcs == (12345,)
    assert offer.payload_types == [0, 8] and offer.dtmf_type == 101


@SETTINGS
@given(st.one_of(mutated(), st.binary(max_size=600)))
def test_the_transport_answers_or_drops_and_never_raises(data: bytes) -> None:
    """The socket's receive step on a real loopback socket, with a call logic that takes
    whatever is parsed; the answers are read by a peer socket."""
    seen: list[str] = []
    transport = SipTransport(lambda message: seen.append(message.method))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(_deliver(transport, data, peer.getsockname()))
        finally:
            loop.close()
        sent = []
        with contextlib.suppress(BlockingIOError):  # loopback delivers within sendto
            while True:
                sent.append(peer.recv(65535))
    assert transport.stats.errors == 0
    try:
        asked = parse(data, PEER).transaction
    except MessageError as error:
        asked = error.headers.transaction()
        assert transport.stats.malformed == (1 if data.strip(b"\r\n\x00") else 0)  # counted
    for answer in sent:  # every answer is a final SIP response to the same transaction
        assert answer.startswith(b"SIP/2.0 ") and int(answer[8:11]) >= 400
        assert _transaction(answer) == asked
    assert len(sent) + len(seen) <= 1


def _transaction(data: bytes) -> tuple[str, int, str] | None:
    """The transaction a message names (an answer echoes the request's headers, which
    need not make a whole message)."""
    try:
        return parse(data, PEER).transaction
    except MessageError as error:
        return error.headers.transaction()


async def _deliver(transport: SipTransport, data: bytes, peer: tuple[str, int]) -> None:
    await transport.open("127.0.0.1", 0)
    try:
        transport.datagram_received(data, peer)
    finally:
        transport.close()


@SETTINGS
@given(st.binary(max_size=200))
def test_rtp_and_rtcp_parsers_never_raise(data: bytes) -> None:
    packet = parse_rtp(data)
    if packet is not None:
        assert 0 <= packet.payload_type < 128 and 0 <= packet.ssrc < 1 << 32
        assert len(packet.payload) > 0
        parse_event(packet.payload)
    reports = parse_compound(data)
    if reports is not None:
        assert reports and all(r.kind in (200, 201) for r in reports)
