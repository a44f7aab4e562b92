"""The talker extension at the leg bank's seam: real packets on a real socket, both ways.

A Python peer (its own SRTP session when the leg has SRTP, as a far gateway would)
sends RTP with header extension blocks — good ones, and every kind of bad one — to
the real bank with a real :class:`OnAir` on the leg; the leg's audio must come through
the batch path untouched by the block, the good words believed, the bad ones counted
by reason and not believed, and a block that runs past its packet dropped as a
malformed packet. The other way, the bank must put our block into every packet it
sends, and the peer must read it back with the audio after it.
"""

from __future__ import annotations

import collections
import secrets
import socket
import struct
import time

import numpy as np
import pytest
from gateway.codecs.g711 import ulaw_decode, ulaw_encode
from pylibsrtp import Policy, Session

from gateway.links.floor import Candidate
from gateway.links.labels import Named
from gateway.links.onair import FLOOR_HOLD, NAMES_KEPT, STALE, OnAir, agreed, offer
from gateway.links.talker import Talker, encode, read
from gateway.sip.bank import LegBank
from gateway.sip.legmedia import LegMedia
from gateway.sip.message import Source, parse
from gateway.sip.sdp import describe, read_offer
from gateway.sip.srtp import LegSrtp, new_crypto
from tests.sip.sip_peers import band_db, dominant_hz
from tests.waiting import wait_for

LABEL = "RCMP · Marine 7"
KEYED = bytes((0x20, 9, 0, 0, 0, 1))  # keyed, talker 9, key-up 1


def two_byte(data: bytes, profile: int = 0x1000, ext_id: int = 1) -> bytes:
    body = bytes((ext_id, len(data))) + data
    body += bytes(-len(body) % 4)
    return struct.pack("!HH", profile, len(body) // 4) + body


BAD = {
    "profile": two_byte(KEYED, profile=0xABCD),
    "element": struct.pack("!HH", 0x1000, 1) + bytes((1, 40, 0x20, 9)),
    "unknown_id": two_byte(KEYED, ext_id=7),
    "version": two_byte(bytes((0x60, 9, 0, 0, 0, 1))),
}


class Peer:
    """The far gateway's media end: sends a 600 Hz tone with a block, keeps what comes."""

    def __init__(self, srtp: bool) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self.ssrc, self.seq, self.ts, self.sent = secrets.randbits(32), 100, 5000, 0
        self.ours, self.theirs = new_crypto(1), new_crypto(1)
        self.tx = (
            Session(Policy(self.ours.key, ssrc_type=Policy.SSRC_ANY_OUTBOUND)) if srtp else None
        )
        self.rx = (
            Session(Policy(self.theirs.key, ssrc_type=Policy.SSRC_ANY_INBOUND)) if srtp else None
        )
        self.received: list[bytes] = []

    def send(self, to: tuple[str, int], block: bytes | None) -> None:
        t = (self.sent * 160 + np.arange(160)) / 8000
        payload = ulaw_encode((0.3 * 32767 * np.sin(2 * np.pi * 600 * t)).astype(np.int16))
        head = struct.pack("!BBHII", 0x90 if block else 0x80, 0, self.seq, self.ts, self.ssrc)
        packet = head + (block or b"") + payload.tobytes()
        self.seq, self.ts, self.sent = self.seq + 1, self.ts + 160, self.sent + 1
        self.sock.sendto(self.tx.protect(packet) if self.tx else packet, to)

    def drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(2048)
            except BlockingIOError:
                return
            self.received.append(self.rx.unprotect(data) if self.rx else data)


def ticks(bank: LegBank, peer: Peer, count: int, block: bytes | None, heard: list) -> None:
    """``count`` paced 20 ms ticks: the peer sends one packet, the bank receives and sends."""
    start = time.monotonic()
    to = ("127.0.0.1", bank.port)
    for k in range(count):
        peer.send(to, block)
        time.sleep(0.002)  # on the wire before the bank drains (loopback: microseconds)
        bank.receive()
        heard.append(
            bank.table.rx[0].copy() if bank.table.talking[0] else np.zeros(bank.frame, np.float32)
        )
        bank.table.tx[0] = 0.0
        bank.table.tx_has[0] = True
        bank.send()
        peer.drain()
        time.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))


@pytest.mark.parametrize("srtp", [False, True], ids=["rtp", "srtp"])
def test_blocks_in_are_read_or_counted_and_the_audio_passes(srtp: bool) -> None:
    bank = LegBank(16000, 320, 0.02, capacity=4)
    peer = Peer(srtp)
    keys = LegSrtp(peer.ours.key, peer.theirs.key) if srtp else None
    row = bank.add(LegMedia(0, None, peer.address, srtp=keys, announced=(peer.ssrc,)))
    assert row == 0
    bank.start_sending(row)
    rejected: collections.Counter = collections.Counter()
    audit: list[tuple[str, dict]] = []
    onair = OnAir(
        bank,
        row,
        1,
        rejected,
        lambda event, **f: audit.append((event, f)),
        link="us",
        share="shiprider",
    )
    heard: list[np.ndarray] = []
    try:
        good = encode(Talker(keyed=True, talker_id=4, keyed_at=77, priority=3))
        ticks(bank, peer, 5, good, heard)
        assert onair.label == "" and bank.table.peer_keyed[row]  # keyed; not named yet
        onair.named(Named(4, 78, "CBSA · Patrol 3"))  # another over's (key-up differs)
        onair.named(Named(4, 77, LABEL))  # the peer names its over in the dialog
        ticks(bank, peer, 20, good, heard)
        assert onair.label == LABEL and bank.table.peer_keyed[row] and bank.table.talking[row]
        assert onair.report("us", 1000) == Candidate("us", 4, 77, 3)
        said = np.concatenate(heard[-15:])
        # (concealment may bend a late tick on a loaded machine: the band, not the bin)
        assert abs(dominant_hz(said, 16000) - 600) < 25 and band_db(said, 16000, 600) > -17
        assert sum(bank.table.malformed.values()) == 0 and bank.table.packets_in[row] >= 24
        for reason, block in BAD.items():
            ticks(bank, peer, 5, block, heard)
            assert rejected[reason] >= 4, (reason, rejected)  # (the 5th may be on the wire)
            assert onair.heard is not None and onair.heard.talker_id == 4, "a bad block believed"
            said = np.concatenate(heard[-5:])  # (a late tick may conceal a frame or two)
            assert band_db(said, 16000, 600) > -30, f"{reason}: the audio was lost"
        before = rejected["element"]  # an old-style block with the label: not believed
        ticks(bank, peer, 5, two_byte(KEYED + LABEL.encode()), heard)
        assert rejected["element"] >= before + 4 and onair.heard.talker_id == 4
        if not srtp:  # (SRTP will not protect such a packet: libsrtp parses the header)
            # A block whose length runs past the packet: the packet is malformed, dropped.
            before = bank.table.packets_in[row]
            ticks(bank, peer, 5, struct.pack("!HH", 0x1000, 60) + bytes(8), heard)
            assert bank.table.malformed["layout"] >= 4 and bank.table.packets_in[row] <= before + 1
        # The over ends: the peer unkeys, and the over is audited with its label.
        ticks(bank, peer, 5, encode(Talker(keyed=False, talker_id=4, keyed_at=77)), heard)
        assert not bank.table.peer_keyed[row] and onair.label == LABEL
        ((event, fields),) = audit
        assert event == "link_talker" and fields["label"] == LABEL and fields["talker_id"] == 4
        assert fields["priority"] == 3 and fields["link"] == "us" and fields["seconds"] > 0.5
        for talker_id in range(10, 10 + 3 * NAMES_KEPT):  # labels sent ahead: a capped table
            onair.named(Named(talker_id, 1, "x"))
        assert len(onair.names) == NAMES_KEPT and onair.label == LABEL  # (the last over's kept)
    finally:
        bank.close()
        peer.sock.close()


@pytest.mark.parametrize("srtp", [False, True], ids=["rtp", "srtp"])
def test_our_words_go_out_in_every_packet_and_the_label_once_beside(srtp: bool) -> None:
    bank = LegBank(16000, 320, 0.02, capacity=4)
    peer = Peer(srtp)
    keys = LegSrtp(peer.ours.key, peer.theirs.key) if srtp else None
    plain_peer = Peer(False)
    row = bank.add(LegMedia(0, None, peer.address, srtp=keys, announced=(peer.ssrc,)))
    other = bank.add(LegMedia(0, None, plain_peer.address))  # a phone: no extension
    bank.start_sending(row)
    bank.start_sending(other)
    onair = OnAir(bank, row, 5, collections.Counter(), lambda *a, **k: None)
    told: list[Named] = []

    def tell(named: Named) -> bool:  # the first try cannot go (not ACKed): again next tick
        told.append(named)
        return len(told) > 1

    onair.tell = tell
    try:
        me = Candidate("ca", 1, keyed_at_ms=123456, priority=2, emergency=True)
        start = time.monotonic()
        for k in range(10):
            onair.announce(1000 + 20 * k, me, LABEL, squelch=True)
            t = (k * 320 + np.arange(320)) / 16000
            bank.table.tx[[row, other]] = (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
            bank.table.tx_has[[row, other]] = True
            bank.send()
            time.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))

        def ten_arrived() -> bool:
            peer.drain()
            plain_peer.drain()
            return len(peer.received) >= 10

        wait_for(ten_arrived, 2, "ten packets at the SRTP peer")
        plain_peer.drain()
        assert len(peer.received) == 10
        said = [read(p, 5) for p in peer.received]
        assert all(
            isinstance(t, Talker)
            and t.keyed
            and t.emergency
            and t.priority == 2
            and t.keyed_at == 123456
            and t.squelch
            for t in said
        )
        assert all(LABEL.encode() not in p for p in peer.received), "the label in the RTP"
        # Told once in the dialog (the first try could not go: again on the next tick).
        assert told == [Named(said[0].talker_id, 123456, LABEL)] * 2
        audio = []
        for packet in peer.received:
            block_words = int.from_bytes(packet[14:16], "big")
            payload = packet[12 + 4 + 4 * block_words :]
            assert len(payload) == 160
            audio.append(ulaw_decode(np.frombuffer(payload, np.uint8)).astype(np.float32))
        tone = np.concatenate(audio) / 32768
        assert abs(dominant_hz(tone, 8000) - 1000) < 10
        # The phone's packets in the same batch carry no extension.
        assert plain_peer.received and all(p[0] == 0x80 for p in plain_peer.received)
        assert all(len(p) == 172 for p in plain_peer.received)
    finally:
        bank.close()
        peer.sock.close()
        plain_peer.sock.close()


def sdp(text: str):  # noqa: ANN201
    body = text
    raw = (
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1\r\nFrom: <sip:a@b>;tag=1\r\n"
        "To: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    return read_offer(parse(raw.encode(), Source(("127.0.0.1", 5060))))


def test_the_extension_is_agreed_in_sdp_with_each_sides_site_id() -> None:
    ours = describe("127.0.0.1", 4000, [0], 101, extmap=offer("ca"))
    assert "a=extmap:1 urn:borderlink:talker site=ca\r\n" in ours
    assert "a=extmap-allow-mixed" in ours
    assert agreed(sdp(ours), "us") == (1, "ca")
    assert agreed(sdp(ours), "ca") is None  # the peer claims our own site ID: refused
    plain = describe("127.0.0.1", 4000, [0], 101)  # a BSI-Core peer: keyed by voice
    assert agreed(sdp(plain), "us") is None
    other = ours.replace("a=extmap:1 urn:borderlink:talker site=ca", "a=extmap:9 urn:x:y")
    assert agreed(sdp(other), "us") is None
    nameless = ours.replace(" site=ca", "")
    assert agreed(sdp(nameless), "us") is None
    assert agreed(sdp(ours.replace("extmap:1 ", "extmap:12/sendrecv ")), "us") == (12, "ca")


def test_a_peer_that_stalls_keeps_a_shared_floor_for_a_moment() -> None:
    """Its packets stop: after STALE its talker is no longer keyed here (no stuck
    transmitter), but it keeps the floor until FLOOR_HOLD, so a sender stalled for a
    moment does not make this side hand the floor to someone else while the other sides
    still give it to that talker (a three-gateway mesh under load did). When its packets
    come back in the same over, it is keyed again; past FLOOR_HOLD it holds nothing."""
    bank = LegBank(16000, 320, 0.02, capacity=4)
    peer = Peer(srtp=False)
    row = bank.add(LegMedia(0, None, peer.address, announced=(peer.ssrc,)))
    bank.start_sending(row)
    onair = OnAir(
        bank, row, 1, collections.Counter(), lambda event, **f: None, link="us", share="shiprider"
    )
    heard: list[np.ndarray] = []
    over = encode(Talker(keyed=True, talker_id=4, keyed_at=77, emergency=True))
    try:
        ticks(bank, peer, 10, over, heard)
        last = float(bank.table.rtp_at[row])
        now_ms = int(last * 1000)
        first = onair.report("us", now_ms)
        assert first is not None and (first.talker, first.emergency) == (4, True)
        onair.check_stale(last + STALE + 0.05)  # silent past STALE
        assert not bank.table.peer_keyed[row] and not onair.heard.keyed
        held = onair.report("us", int((last + STALE + 0.05) * 1000))
        assert held == first, "a stalled peer lost the floor at once"
        assert onair.report("us", int((last + FLOOR_HOLD - 0.05) * 1000)) == held
        ticks(bank, peer, 3, over, heard)  # back, in the same over
        assert bank.table.peer_keyed[row] and onair.report("us", now_ms) == held
        last = float(bank.table.rtp_at[row])
        onair.check_stale(last + STALE + 0.05)
        assert onair.report("us", int((last + FLOOR_HOLD + 0.05) * 1000)) is None
    finally:
        bank.close()
        peer.sock.close()
