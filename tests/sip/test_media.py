"""The SIP media path's parts on their own: RTP checks, loss/jitter stats, the jitter bank,
the batched resampler, SDP and the [sip] section. Network timing is simulated here
(arrival times computed from a delay model), so each case is exact and repeatable;
the live path is covered with real phones in test_calls/test_features."""

from __future__ import annotations

import numpy as np
import pytest
from gateway.codecs.g711 import alaw_encode, ulaw_encode
from pydantic import ValidationError

from gateway.config import ConfigError, parse_config
from gateway.sip.bank import DECODE, ENCODE
from gateway.sip.config import SipConfig
from gateway.sip.jitter import TARGET_RANK, JitterBank
from gateway.sip.message import Source, parse
from gateway.sip.resample import BlockResampler
from gateway.sip.rtp import ReceiveStats, build_event, build_header, parse_event, parse_rtp
from gateway.sip.sdp import choose_codec, read_offer

F = 160  # 20 ms of G.711


# --- RTP ---------------------------------------------------------------------------------


def test_rtp_header_round_trip_and_every_malformed_shape_is_refused():
    packet = build_header(8, True, 65535, 0xFFFFFFFF, 0x1234) + bytes(range(160))
    parsed = parse_rtp(packet)
    assert parsed and parsed.payload_type == 8 and parsed.marker
    assert (parsed.sequence, parsed.timestamp, parsed.ssrc) == (65535, 0xFFFFFFFF, 0x1234)
    assert bytes(parsed.payload) == bytes(range(160))
    header = build_header(0, False, 1, 160, 7)
    csrc_beyond_end = bytes([0x8F]) + header[1:] + bytes(8)  # says 15 CSRCs, carries 2
    extension_beyond_end = bytes([0x90]) + header[1:] + bytes([0, 0, 0, 50])
    for bad in (
        header[:11],
        bytes([0x40]) + header[1:] + bytes(160),
        header + bytes(1600),
        csrc_beyond_end,
        extension_beyond_end,
        bytes([0xA0]) + header[1:] + bytes([1, 2, 0]),  # padding length 0
        bytes([0xA0]) + header[1:] + bytes([1, 2, 9]),  # padding longer than payload
        header,  # no payload
    ):
        assert parse_rtp(bad) is None, bad[:16]


def test_dtmf_events_round_trip():
    for digit in "0123456789*#ABCD":
        event = parse_event(memoryview(build_event(digit, True, 800)))
        assert event and (event.digit, event.end, event.duration) == (digit, True, 800)
    assert parse_event(memoryview(bytes([16, 0, 0, 0]))) is None  # not a DTMF key
    assert parse_event(memoryview(bytes([1, 0]))) is None


def test_receive_stats_count_loss_across_sequence_wrap_and_ssrc_change():
    stats = ReceiveStats()
    sequences = [65530, 65531, 65533, 65534, 65535, 0, 2, 3]  # 65532 and 1 lost
    for i, seq in enumerate(sequences):
        stats.update(1, seq, i * F, i * F)
    assert stats.lost == 2 and stats.expected == 10
    assert stats.jitter == pytest.approx(0.0)
    assert stats.update(2, 100, 0, 50 * F)  # new SSRC: the caller resyncs
    stats.update(2, 102, 2 * F, 52 * F)
    assert stats.lost + stats.lost_before == 3


# --- jitter bank -------------------------------------------------------------------------


def simulate(
    jitter_ms: float = 0.0,
    loss: float = 0.0,
    seconds: float = 10.0,
    seed: int = 1,
    burst: tuple[int, int, float] | None = None,
    reorder: bool = False,
    whole: bool = False,
    spikes: tuple[int, ...] = (),
):
    """Play a 1 kHz µ-law stream through one row: returns audio, delays (ms), the bank.
    ``whole``: the row's packets cannot be cut (an Opus leg's row)."""
    rng = np.random.default_rng(seed)
    bank = JitterBank(2, F)
    bank.whole[0] = whole
    n = int(seconds * 50)
    t = np.arange(n * F)
    codes = ulaw_encode((0.3 * np.sin(2 * np.pi * 1000 * t / 8000) * 32767).astype(np.int16))
    delay = 8 * (7.3 + rng.uniform(-jitter_ms, jitter_ms, n))  # 7.3 ms off the tick phase
    if burst:
        first, last, extra_ms = burst
        delay[first:last] += 8 * extra_ms
    if reorder:
        delay[1::10] += 8 * 25  # every tenth packet overtaken by the next one
    for k in spikes:
        delay[k] += 8 * 60  # this packet alone comes 60 ms late
    arrival = np.arange(n) * F + F + delay + 1000
    lost = rng.random(n) < loss
    order = np.argsort(arrival, kind="stable")
    out, delays, i = [], [], 0
    for k in range(n):
        now = 1000 + k * F
        while i < n and arrival[order[i]] <= now:
            p = order[i]
            i += 1
            if not lost[p]:
                bank.put_batch(
                    np.array([0]),
                    np.array([(4_000_000_000 + p * F) & 0xFFFFFFFF]),
                    codes[p * F : (p + 1) * F].reshape(1, -1),
                    np.array([float(arrival[p])]),
                    np.array([False]),
                )  # one packet, as the leg bank puts a batch whose rows are all different
        frame = bank.playout(
            np.array([0]), float(now), np.array([True]), DECODE, np.zeros(2, np.int64)
        )
        out.append(frame[0])
        delays.append(bank.delay[0] / 8)
    return np.concatenate(out), np.array(delays), bank, int(lost.sum())


def test_no_jitter_adds_less_than_one_packet_and_conceals_nothing():
    audio, delays, bank, _ = simulate()
    assert bank.packets_late[0] == 0
    assert bank.concealed[0] <= F  # only the very first frame, before audio starts
    assert np.median(delays[50:]) < 22.0
    spectrum = np.abs(np.fft.rfft(audio[8000:]))
    assert np.argmax(spectrum) * 8000 / len(audio[8000:]) == pytest.approx(1000, abs=2)


def test_whole_packets_are_played_in_the_first_tick_after_they_arrive():
    # An Opus row: no packet is held back a frame in case the next one's FEC is needed
    # (the bank uses FEC only when the next packet is already in hand).
    _, delays, bank, _ = simulate(whole=True)
    assert bank.packets_late[0] == 0
    assert bank.concealed[0] <= F
    assert np.median(delays[50:]) < 20.0, "a packet held a frame longer than needed"


@pytest.mark.parametrize("loss", [0.0, 0.01, 0.05])
def test_30_plus_minus_10ms_jitter_is_absorbed_and_loss_concealed(loss):
    audio, delays, bank, lost = simulate(jitter_ms=10.0, loss=loss)
    assert bank.packets_late[0] <= 2
    assert np.median(delays[100:]) <= 50.0
    assert bank.concealed[0] >= lost * F  # every lost packet was concealed
    assert bank.concealed[0] <= (lost + 3) * F


def test_a_delay_burst_raises_the_buffer_then_it_comes_back_down():
    _, delays, bank, _ = simulate(burst=(100, 110, 60.0))
    before = np.median(delays[50:95])
    assert delays[100:200].max() > before + 50, "the buffer did not follow the burst"
    assert np.median(delays[350:]) < before + 5, "the burst left lasting delay"


def test_a_lone_late_packet_is_concealed_not_waited_for():
    # One packet in two seconds comes 60 ms late (a WAN spike, a sender's late tick):
    # it is dropped and concealed; the others keep their short wait. Waiting for the
    # slowest recent packet held every packet 60 ms longer for the next 1.3 s.
    spikes = tuple(range(75, 500, 100))
    _, delays, bank, _ = simulate(jitter_ms=2.0, spikes=spikes)
    _, calm, _, _ = simulate(jitter_ms=2.0)
    assert bank.packets_late[0] == len(spikes)
    assert bank.concealed[0] <= (len(spikes) + 1) * F
    assert np.percentile(delays[50:], 90) < np.median(calm[50:]) + 5.0


def test_reordered_packets_are_put_back_in_order():
    audio, _, bank, _ = simulate(jitter_ms=2.0, reorder=True)
    # Until the history holds TARGET_RANK of them, an overtaken packet is late (a lone
    # straggler is not waited for); then the buffer covers them.
    assert bank.packets_late[0] <= TARGET_RANK
    assert bank.concealed[0] <= (TARGET_RANK + 1) * F
    reference = 0.3 * np.sin(2 * np.pi * 1000 * np.arange(len(audio)) / 8000)
    corr = np.abs(np.fft.rfft(audio[4000:]))
    assert np.argmax(corr) == np.argmax(np.abs(np.fft.rfft(reference[4000:])))


def test_g711_tables_agree_with_the_codec_module():
    pcm = (np.arange(-32768, 32768, 7)).astype(np.int16)
    assert (ENCODE[0][pcm.view(np.uint16)] == ulaw_encode(pcm)).all()
    assert (ENCODE[1][pcm.view(np.uint16)] == alaw_encode(pcm)).all()
    assert DECODE.shape == (2, 256) and np.abs(DECODE).max() <= 1.0


# --- resampling ------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 6])
def test_block_resampler_keeps_a_tone_and_its_delay_is_the_half_width(factor):
    up = BlockResampler(factor, F, up=True)
    down = BlockResampler(factor, F, up=False)
    legs = 3
    x = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(50 * F) / 8000)).astype(np.float32)
    hist_up = np.zeros((legs, up.history_length), np.float32)
    hist_down = np.zeros((legs, down.history_length), np.float32)
    highs, lows = [], []
    for k in range(50):
        frame = np.tile(x[k * F : (k + 1) * F], (legs, 1))
        high, hist_up = up.process(frame, hist_up)
        low, hist_down = down.process(high.astype(np.float32), hist_down)
        highs.append(high[1])
        lows.append(low[2])
    rate = 8000 * factor
    high = np.concatenate(highs)
    t = np.arange(len(high)) / rate - up.delay_8k / 8000
    assert (
        np.abs(high[rate // 10 :] - 0.5 * np.sin(2 * np.pi * 1000 * t[rate // 10 :])).max() < 0.01
    )
    low = np.concatenate(lows)
    t = np.arange(len(low)) / 8000 - 2 * up.delay_8k / 8000
    assert np.abs(low[800:] - 0.5 * np.sin(2 * np.pi * 1000 * t[800:])).max() < 0.01


# --- SDP and signalling parse --------------------------------------------------------------

BARESIP_INVITE = (
    b"INVITE sip:6001@127.0.0.1:5080;transport=udp SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;rport\r\n"
    b"Contact: <sip:phone1@127.0.0.1:5070>\r\nMax-Forwards: 70\r\n"
    b"To: <sip:6001@127.0.0.1:5080>\r\nFrom: <sip:phone1@127.0.0.1>;tag=abc\r\n"
    b"Call-ID: c1\r\nCSeq: 1 INVITE\r\nSupported:\r\nContent-Type: application/sdp\r\n"
    b"Content-Length: 183\r\n\r\n"
    b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 17160 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=ptime:20"
)


def test_an_empty_header_is_skipped_and_the_offer_is_read():
    offer = read_offer(parse(BARESIP_INVITE, Source(("127.0.0.1", 5070))))  # "Supported:"
    assert offer.address == "127.0.0.1" and offer.port == 17160
    assert offer.payload_types == [8, 0] and offer.dtmf_type == 101
    assert choose_codec(offer, ["pcmu", "pcma"]) == 8  # the offerer's preference
    assert choose_codec(offer, ["pcmu"]) == 0


# --- config ------------------------------------------------------------------------------

SITE = """
[site]
name = "t"
country = "US"
[ports.r]
kind = "simulated_radio"
[talkgroups.tg]
members = ["r"]
"""


def test_sip_section_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError) as error:
        parse_config(
            SITE + '[sip]\nlisten = "127.0.0.1:99999"\n[sip.routes."6001"]\ntalkgroup = "tg"\n'
            "public = true\nvox_hang = 800\n"
        )
    text = str(error.value)
    assert "sip.listen" in text and "host:port" in text
    assert "sip.routes.6001.vox_hang" in text and "800ms" in text
    with pytest.raises(ValidationError, match="routes twice"):
        SipConfig.model_validate(
            {
                "routes": {
                    "1": {"talkgroup": "a", "public": True},
                    "2": {"talkgroup": "a", "public": True, "aliases": ["1"]},
                }
            }
        )
    config = SipConfig.model_validate({"routes": {"6001": {"talkgroup": "nope", "public": True}}})
    assert "talkgroup 'nope' is not configured" in config.check_talkgroups(["tg"])[0]
    with pytest.raises(ConfigError) as error:
        parse_config(SITE + '[sip]\nack_timeout = "5min"\n')
    assert "sip.ack_timeout" in str(error.value) and "Timer H" in str(error.value)
    with pytest.raises(ConfigError) as error:
        parse_config(SITE + '[sip]\nmedia_timeout = "2s"\n')
    assert "media_timeout" in str(error.value) and "rtcp_interval" in str(error.value)


def test_stream_bank_columns_agree_with_the_one_stream_reference():
    """The vectorised receive stats (all legs per call) against ReceiveStats, packet by
    packet: loss, reordering, duplicates, a sequence wrap, jitter and an SSRC change."""
    from gateway.sip.streams import StreamBank

    rng = np.random.default_rng(5)
    legs = 3
    bank = StreamBank(4)
    refs = [ReceiveStats() for _ in range(legs)]
    seqs = [65000, 10, 40000]
    for k in range(600):
        rows, ssrc, seq, ts, arrival = [], [], [], [], []
        for leg in range(legs):
            if rng.random() < 0.05:
                continue  # lost
            s = (seqs[leg] + k + (1 if rng.random() < 0.05 else 0)) & 0xFFFF  # reordered
            if rng.random() < 0.02:
                s = (s - 3) & 0xFFFF  # a late duplicate
            new_ssrc = 1000 + leg + (7 if k >= 400 and leg == 1 else 0)  # leg 1 restarts
            rows.append(leg)
            ssrc.append(new_ssrc)
            seq.append(s)
            ts.append(k * F)
            arrival.append(k * F + rng.uniform(0, 80))
        if not rows:
            continue
        columns = [np.array(v, np.int64) for v in (rows, ssrc, seq, ts)]
        changed = bank.update(*columns, np.array(arrival, np.float64))
        for i, leg in enumerate(rows):
            assert refs[leg].update(ssrc[i], seq[i], ts[i], arrival[i]) == (leg in changed)
    for leg, ref in enumerate(refs):
        assert int(bank.lost_of(leg)) == ref.lost, leg
        assert int(bank.lost_before[leg]) == ref.lost_before, leg
        assert int(bank.expected_of(leg)) == ref.expected, leg
        assert bank.jitter[leg] == pytest.approx(ref.jitter), leg
