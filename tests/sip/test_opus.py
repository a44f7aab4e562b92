"""One Opus leg's receive side with the real libopus: a lost packet is rebuilt from the
next one's in-band FEC only when that packet is in hand and carries FEC, and only then
counted as recovered. (Opus across two real gateways: tests/links/test_link_opus.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from gateway.sip.opus import OpusLeg, available, has_fec, packet_samples
from tests.conftest import missing


@pytest.fixture(autouse=True)
def libopus() -> None:
    """The real libopus (Debian libopus0): in CI its absence fails, never skips."""
    if not available(16000, 0.02):
        missing("libopus (Debian package libopus0)")


RATE, FRAME = 16000, 320
STEP = 160  # one packet in the jitter bank's 8 kHz units
TONE_HZ = 1033.0


def packets(count: int) -> list[bytes]:
    """``count`` packets of a steady -20 dBFS tone, from a fresh encoder."""
    sender = OpusLeg(RATE, FRAME)
    t = np.arange(count * FRAME) / RATE
    tone = (0.1 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
    return [sender.encode(tone[k * FRAME : (k + 1) * FRAME]) for k in range(count)]


def play(held: dict[int, bytes], count: int, late: dict[int, int] | None = None):
    """Play slots 0..count-1 with ``held`` (packet index → payload) in hand from the start;
    packet ``j`` of ``late`` (j → k) arrives only after slot k - 1 was played. Returns
    what happened at each slot, and the leg."""
    leg = OpusLeg(RATE, FRAME)
    for j, payload in held.items():
        if j not in (late or {}):
            leg.hold(j * STEP, payload)
    what = []
    for k in range(count):
        for j, at in (late or {}).items():
            if at == k:
                leg.hold(j * STEP, held[j])
        what.append(leg.play(k * STEP, STEP, recent=True)[1])
    return what, leg


def test_the_first_packet_after_a_pause_carries_no_fec_and_later_ones_do():
    sent = packets(6)
    assert not has_fec(sent[0]), "nothing before it to protect"
    assert all(has_fec(p) for p in sent[1:])
    assert not has_fec(bytes([9 << 3]))  # the one-byte silence packet
    assert not has_fec(b"")


def test_a_lost_packet_is_rebuilt_from_the_next_one_when_it_is_in_hand():
    sent = packets(12)
    held = {k: p for k, p in enumerate(sent) if k != 6}
    what, leg = play(held, 12)
    assert what[6] == "fec" and leg.fec_recovered == 1
    assert what.count("packet") == 11


def test_without_the_next_packet_in_hand_a_loss_is_concealed_not_counted_as_fec():
    sent = packets(12)
    held = {k: p for k, p in enumerate(sent) if k != 6}
    what, leg = play(held, 12, late={7: 7})  # 7 arrives only after 6 was played
    assert what[6] == "plc" and what[7] == "packet"
    assert leg.fec_recovered == 0


def test_a_next_packet_without_fec_gives_concealment_not_a_recovery():
    # Packet 1 lost; packet 2 is in hand but is a restarted encoder's first packet (the
    # peer paused, or reset): it carries no LBRR data, so "decoding its FEC" would only
    # be libopus concealing.
    first = packets(3)
    restarted = packets(2)[0]  # a fresh encoder's first packet: no FEC inside
    held = {0: first[0], 2: restarted}
    what, leg = play(held, 3)
    assert what[1] == "plc", "libopus would only conceal: not a recovery"
    assert leg.fec_recovered == 0


def test_a_slot_played_again_when_the_buffer_grows_is_concealed_not_counted_as_fec():
    # The jitter bank steps its playout point back a packet to cover more jitter: slot 5
    # comes again, its packet already decoded. The gap is made up by concealment; the
    # next packet's FEC (a copy of 5) would not be a lost packet rebuilt.
    sent = packets(12)
    leg = OpusLeg(RATE, FRAME)
    for j, payload in enumerate(sent):
        leg.hold(j * STEP, payload)
    what = [leg.play(k * STEP, STEP, recent=True)[1] for k in (0, 1, 2, 3, 4, 5, 5, 6, 7)]
    assert what == ["packet"] * 6 + ["plc", "packet", "packet"]
    assert leg.fec_recovered == 0


def test_at_10ms_frames_packets_are_10ms_and_a_loss_is_rebuilt_from_fec():
    # A 10 ms engine sends one 10 ms packet a tick (TOC configuration 8, SILK wideband
    # 10 ms), its silence too, and rebuilds a loss from the next packet's FEC as at 20 ms.
    frame, step = FRAME // 2, STEP // 2
    sender, receiver = OpusLeg(RATE, frame), OpusLeg(RATE, frame)
    t = np.arange(12 * frame) / RATE
    tone = (0.1 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
    sent = [sender.encode(tone[k * frame : (k + 1) * frame]) for k in range(12)]
    assert all(p[0] >> 3 == 8 and packet_samples(p) == 480 for p in sent)
    assert sender.encode(np.zeros(frame, np.float32)) == bytes([8 << 3])
    for k, payload in enumerate(sent):
        if k != 6:
            receiver.hold(k * step, payload)
    what = [receiver.play(k * step, step, recent=True) for k in range(12)]
    assert [w for _, w in what].count("packet") == 11 and what[6][1] == "fec"
    assert all(len(pcm) == frame for pcm, _ in what)
    assert available(RATE, 0.01) and not available(RATE, 0.03)
