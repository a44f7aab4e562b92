"""What an idle link leg costs: an Opus leg at rest sends its silence as DTX, and the
bank hands the owner a talker block only when it changed.

Real packets on a real socket, as in test_onair: a raw peer reads what the bank sends
on an Opus link leg with a real :class:`OnAir`, and sends the bank blocks of its own.
An idle shared talkgroup must cost both sides almost nothing (#15: a hundred shared
talkgroups, ten talking, in a quarter of a core), yet everything that matters goes
across at once: the first packet of speech, a key-up even with nothing said, the
unkey (repeated, against a loss), and a keyed talker's packets never pause.
"""

from __future__ import annotations

import collections
import struct
import time

import numpy as np
import pytest

from gateway.links.floor import Candidate
from gateway.links.onair import OnAir
from gateway.links.talker import Talker, encode, read
from gateway.sip.bank import LegBank
from gateway.sip.bank_opus import NEWS_PACKETS, REST_MS
from gateway.sip.legmedia import LegMedia
from gateway.sip.opus import available
from gateway.sip.rtp import OPUS
from gateway.sip.srtp import LegSrtp
from tests.conftest import missing
from tests.links.test_onair import KEYED, Peer, ticks, two_byte
from tests.waiting import wait_for

OPUS_PT = 111
EXT_ID = 5


def opus_bank() -> None:
    if not available(16000, 0.02):
        missing("libopus (the opuslib_next binding)")


def send_ticks(
    bank: LegBank, row: int, count: int, loud: bool, onair: OnAir, me: Candidate | None = None
) -> None:
    """``count`` paced ticks of the bank's send step; ``me``: the talker we carry."""
    start = time.monotonic()
    frame = bank.frame
    for k in range(count):
        onair.announce(int(time.time() * 1000), me, "CBSA · Patrol 3" if me else "")
        t = (k * frame + np.arange(frame)) / 16000
        bank.table.tx[row] = (0.3 * np.sin(2 * np.pi * 700 * t)).astype(np.float32) * loud
        bank.table.tx_has[row] = True
        bank.send()
        time.sleep(max(0.0, start + (k + 1) * frame / 16000 - time.monotonic()))


def header(packet: bytes) -> tuple[int, int, Talker, int]:
    """(sequence number, RTP time, our words, payload bytes) of a packet we sent."""
    seq, ts = struct.unpack("!HI", packet[2:8])
    said = read(packet, EXT_ID)
    assert isinstance(said, Talker), said
    payload = len(packet) - 16 - 4 * int.from_bytes(packet[14:16], "big")
    return seq, ts, said, payload


@pytest.mark.parametrize("frame_ms", [20, 10])
def test_an_idle_opus_leg_rests_and_news_goes_across_at_once(frame_ms: int) -> None:
    """The rest is 400 ms whatever the frame: at 10 ms a rest counted in packets sent
    twice the idle packets (#15, the 10 ms CPU figure)."""
    opus_bank()
    bank = LegBank(16000, 16 * frame_ms, frame_ms / 1000, capacity=4)
    rest_packets = REST_MS // frame_ms
    peer = Peer(srtp=False)
    row = bank.add(LegMedia(OPUS_PT, None, peer.address, codec=OPUS))
    bank.start_sending(row)
    onair = OnAir(bank, row, EXT_ID, collections.Counter(), lambda *a, **k: None)

    def arrived(count: int) -> list[tuple[int, int, Talker, int]]:
        def enough() -> bool:
            peer.drain()
            return len(peer.received) >= count

        wait_for(enough, 5, f"{count} packets at the peer")
        time.sleep(0.1)  # (nothing more may come: the bank sent all it will)
        peer.drain()
        got = [header(p) for p in peer.received]
        peer.received.clear()
        return got

    try:
        # Nobody keyed, nothing said: the news of the start, then one packet a rest.
        send_ticks(bank, row, 3 * rest_packets, False, onair)
        idle = arrived(NEWS_PACKETS + 2)
        assert len(idle) <= NEWS_PACKETS + 3, f"{len(idle)} packets from an idle leg"
        assert all(size == 1 for _, _, _, size in idle)  # DTX silence
        seqs = [s for s, _, _, _ in idle]
        assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(len(idle))], "a gap in sequence"
        rests = zip(idle[NEWS_PACKETS - 1 :], idle[NEWS_PACKETS:], strict=False)
        steps = {(b[1] - a[1]) & 0xFFFFFFFF for a, b in rests}
        assert steps == {48 * REST_MS}, f"RTP time between rests: {steps}"
        assert not any(t.keyed for _, _, t, _ in idle)
        # A key-up with nothing said yet: at once, and every tick while keyed.
        me = Candidate("ca", 1, keyed_at_ms=123456, priority=2)
        send_ticks(bank, row, 15, False, onair, me)
        keyed = arrived(15)
        assert len(keyed) == 15 and all(t.keyed for _, _, t, _ in keyed)
        # Speech while keyed: every tick, Opus packets (not the one-byte silence).
        send_ticks(bank, row, 10, True, onair, me)
        speech = arrived(10)
        assert len(speech) == 10 and all(t.keyed and size > 20 for _, _, t, size in speech)
        # The unkey: at once and repeated, then the leg rests again.
        send_ticks(bank, row, 2 * rest_packets, False, onair)
        after = arrived(NEWS_PACKETS + 1)
        assert not any(t.keyed for _, _, t, _ in after)
        assert NEWS_PACKETS <= len(after) <= NEWS_PACKETS + 2, f"{len(after)} after the unkey"
        assert after[0][0] == (speech[-1][0] + 1) & 0xFFFF
        # Speech from an unkeyed leg (a relayed voice-keyed phone): every frame goes.
        send_ticks(bank, row, 10, True, onair)
        assert len(arrived(10)) == 10
    finally:
        bank.close()
        peer.sock.close()


def test_the_owner_hears_a_block_once_per_change_not_per_packet() -> None:
    """The peer repeats its words on every packet; OnAir reads them when they change
    (and again after a block it rejected, or after the peer fell silent while keyed)."""
    bank = LegBank(16000, 320, 0.02, capacity=4)
    peer = Peer(srtp=True)
    keys = LegSrtp(peer.ours.key, peer.theirs.key)
    row = bank.add(LegMedia(0, None, peer.address, srtp=keys, announced=(peer.ssrc,)))
    bank.start_sending(row)
    rejected: collections.Counter = collections.Counter()
    onair = OnAir(bank, row, 1, rejected, lambda *a, **k: None)
    media = bank.table.media[row]
    handed: list[bytes] = []

    def counted(block: bytes) -> None:
        handed.append(block)
        onair.on_extension(block)

    media.on_extension = counted
    heard: list[np.ndarray] = []
    try:
        first = encode(Talker(keyed=True, talker_id=4, keyed_at=77))
        ticks(bank, peer, 20, first, heard)
        assert handed == [first] and bank.table.peer_keyed[row]
        bad = two_byte(KEYED, ext_id=7)  # an ID we never agreed: counted on every packet
        ticks(bank, peer, 5, bad, heard)
        assert rejected["unknown_id"] >= 4 and len(handed) >= 5
        handed.clear()
        ticks(bank, peer, 10, first, heard)  # the same words again: read again, once
        assert handed == [first]
        # Two packets of the leg in one batch, the words changing between them: both read,
        # in order, and the later ones stand.
        second = encode(Talker(keyed=True, talker_id=5, keyed_at=90))
        to = ("127.0.0.1", bank.port)
        peer.send(to, second)
        peer.send(to, first)
        time.sleep(0.01)
        bank.receive()
        assert handed[-2:] == [second, first] and onair.heard.talker_id == 4
        handed.clear()
        ticks(bank, peer, 5, first, heard)
        assert handed == []
        # Silent past STALE while keyed: unkeyed here; the same words, back, key it again.
        onair.check_stale(float(bank.table.rtp_at[row]) + 1.0)
        assert not bank.table.peer_keyed[row]
        ticks(bank, peer, 2, first, heard)
        assert handed == [first] and bank.table.peer_keyed[row]
    finally:
        bank.close()
        peer.sock.close()
