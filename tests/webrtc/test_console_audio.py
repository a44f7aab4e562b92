"""The console's audio edge on its own: Opus at 48 kHz both ways, shared encodes, FIFO bounds."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
from console_site import fft_peak_hz, rms_dbfs
from gateway.codecs.tones import ToneGenerator

from gateway.webrtc.audio import Inbound, OpusStream, SharedEncoders, silence_packet
from gateway.webrtc.server import filter_remote_candidates, offers_stereo

RATE, FRAME = 16000, 320


def decode(packets: list[bytes]) -> np.ndarray:
    """A plain libopus decoder, as a browser would run it (48 kHz)."""
    codec = av.CodecContext.create("libopus", "r")
    codec.sample_rate = 48000
    out = []
    for i, payload in enumerate(packets):
        packet = av.Packet(payload)
        packet.pts, packet.time_base = i * 960, Fraction(1, 48000)
        for frame in codec.decode(packet):
            data = frame.to_ndarray().reshape(-1)
            channels = len(frame.layout.channels)
            mono = data[::channels] if not frame.format.is_planar else frame.to_ndarray()[0]
            out.append(mono.astype(np.float32) / (32768.0 if mono.dtype == np.int16 else 1.0))
    return np.concatenate(out)


def test_opus_stream_carries_a_tone_at_48k():
    tone = ToneGenerator([1000.0], RATE, -12.0)
    stream = OpusStream(RATE, 0.020)
    packets = [p for _ in range(50) for p in stream.encode(tone.read(FRAME))]
    assert 48 <= len(packets) <= 50  # one Opus packet per engine frame
    audio = decode(packets)[4800:]  # skip the codec's start-up
    assert abs(fft_peak_hz(audio, 48000) - 1000) < 5
    assert abs(rms_dbfs(audio) - (-12.0)) < 1.5  # the tone generator sets RMS level


def test_shared_encode_is_reused_only_for_the_identical_frame():
    shared = SharedEncoders(RATE, 0.020, 32000)
    tone = ToneGenerator([700.0], RATE, -12.0)
    frame = tone.read(FRAME)
    first = shared.packets("marine", 1, frame)
    assert shared.packets("marine", 1, frame.copy()) is first  # same mix, same tick: shared
    assert shared.packets("marine", 1, frame * 0.5) is None  # different mix: own encoder
    assert shared.packets("marine", 2, frame) is not first  # next tick: encoded again
    assert (shared.encodes, shared.shares) == (2, 1)


def decode_stereo(packets: list[bytes]) -> np.ndarray:
    """(samples, 2): what a browser that asked for stereo (stereo=1) decodes."""
    codec = av.CodecContext.create("libopus", "r")
    codec.sample_rate, codec.layout = 48000, "stereo"
    out = []
    for i, payload in enumerate(packets):
        packet = av.Packet(payload)
        packet.pts, packet.time_base = i * 960, Fraction(1, 48000)
        for frame in codec.decode(packet):
            data = frame.to_ndarray()
            both = data.T if frame.format.is_planar else data.reshape(-1, 2)
            out.append(both.astype(np.float32) / (32768.0 if both.dtype == np.int16 else 1.0))
    return np.concatenate(out)


def test_a_side_puts_the_talkgroup_in_one_ear_and_both_is_mono():
    tone = ToneGenerator([700.0], RATE, -12.0)
    frames = [tone.read(FRAME) for _ in range(50)]
    for side, loud in (("left", 0), ("right", 1)):
        stream = OpusStream(RATE, 0.020, side=side)
        ears = decode_stereo([p for f in frames for p in stream.encode(f)])[4800:]
        assert abs(rms_dbfs(ears[:, loud]) - (-12.0)) < 1.5, side
        assert rms_dbfs(ears[:, 1 - loud]) < -50, side  # the other ear stays silent
    shared = SharedEncoders(RATE, 0.020, 32000)  # one encode per talkgroup and side
    both = shared.packets("marine", 1, frames[0])
    assert shared.packets("marine", 1, frames[0], "left") is not both
    assert shared.packets("marine", 1, frames[0], "left") is not None
    assert (shared.encodes, shared.shares) == (2, 1)


def test_offers_stereo_reads_the_opus_fmtp():
    sdp = "v=0\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;stereo=1;useinbandfec=1\r\n"
    assert offers_stereo(sdp)
    assert not offers_stereo(sdp.replace("stereo=1;", ""))
    assert not offers_stereo(sdp.replace("a=fmtp:111", "a=fmtp:112"))


def test_silence_packet_decodes_to_silence():
    packet = silence_packet(0.020)
    assert len(packet) < 40
    assert rms_dbfs(decode([packet] * 10)) < -80


def test_inbound_resamples_and_never_builds_up_delay():
    inbound = Inbound(RATE, FRAME, max_frames=3)
    t = np.arange(960 * 20) / 48000
    pcm = (0.25 * np.sin(2 * np.pi * 1200 * t) * 32767).astype(np.int16)
    for i in range(20):  # 400 ms arrive in a burst, nobody reads
        chunk = np.repeat(pcm[i * 960 : (i + 1) * 960], 2).reshape(1, -1)  # stereo, interleaved
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="stereo")
        frame.sample_rate = 48000
        inbound.push(frame)
    frames = []
    while (f := inbound.pop()) is not None:
        frames.append(f)
    assert len(frames) == 3  # only the newest 60 ms are kept
    audio = np.concatenate(frames)
    assert abs(fft_peak_hz(audio, RATE) - 1200) < 30
    assert inbound.dropped_samples == 20 * FRAME - 3 * FRAME


def test_loopback_site_drops_candidates_it_must_not_probe():
    sdp = "\r\n".join(
        [
            "v=0",
            "a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host",
            "a=candidate:2 1 udp 2122194687 10.1.2.3 50001 typ host",
            "a=candidate:3 1 udp 2122129151 4f2a.local 50002 typ host",
            "a=end-of-candidates",
        ]
    )
    kept = filter_remote_candidates(sdp, loopback_only=True)
    assert "127.0.0.1" in kept and "10.1.2.3" not in kept and ".local" not in kept
    assert filter_remote_candidates(sdp, loopback_only=False) == sdp


def test_sender_report_and_cname_parse_as_rtcp():
    """Our hand-packed RTCP (the bank's once-a-second report) reads back field by field."""
    from aiortc.rtp import RtcpPacket, RtcpSdesPacket, RtcpSrPacket

    from gateway.webrtc.rtp import SENDER_REPORT, sdes_cname

    ntp = (3_900_000_000 << 32) | 0x8000_0000
    data = SENDER_REPORT.pack(0x80, 200, 6, 0xCAFE, ntp, 96000, 50, 4000)
    for cname in ("a", "{5c1e0f5a-8f1b-4d7e-9a43-0d7e6c1c2b3a}"):
        sr, sdes = RtcpPacket.parse(data + sdes_cname(0xCAFE, cname))
        assert isinstance(sr, RtcpSrPacket) and isinstance(sdes, RtcpSdesPacket)
        info = sr.sender_info
        assert (sr.ssrc, info.ntp_timestamp, info.rtp_timestamp) == (0xCAFE, ntp, 96000)
        assert (info.packet_count, info.octet_count) == (50, 4000)
        assert sdes.chunks[0].ssrc == 0xCAFE and sdes.chunks[0].items == [(1, cname.encode())]


def test_bank_shares_one_encode_only_with_listeners_hearing_the_same_mix():
    """Through the real engine: five console seats in one talkgroup with a tone talking.

    Three only listen (one shared encode), one talks (its own N-1 encode), one has
    another transmit gain (a different mix: its own encode). What each seat is sent
    decodes to the tone, at its own level.
    """

    from gateway.config import TalkgroupConfig, Timing, ToneSourceConfig
    from gateway.engine import Engine
    from gateway.ports import ToneSource
    from gateway.webrtc.bank import ConsoleBank
    from gateway.webrtc.port import ConsolePort

    timing = Timing()
    engine = Engine(timing)
    tone = ToneSource("tone", ToneSourceConfig(kind="tone", tone_hz=700.0), timing)
    engine.configure([tone], {"tg": TalkgroupConfig(members=["tone"])}, {})
    encoders = SharedEncoders(RATE, 0.020, 32000)
    bank = ConsoleBank(encoders, silence_packet(0.020), engine)
    seats = [
        ConsolePort(
            f"op{k}@tg/{k}",
            timing,
            operator=f"op{k}",
            display="",
            agency="",
            talkgroup="tg",
            may_talk=True,
            priority=10,
            encoders=encoders,
            silence=bank.silence,
            tick=lambda: engine.tick_count,
            bank=bank,
        )
        for k in range(5)
    ]
    sent: list[list[bytes]] = [[] for _ in seats]
    for seat, out in zip(seats, sent, strict=True):
        seat.emit = out.append
        engine.attach(seat, "tg", 10)
    seats[3].ptt = True  # talks (no audio arrives: it still hears the N-1 mix)
    engine.layout.tx_gain[engine.ports.index(seats[4])] = 0.5  # another mix
    for _ in range(50):
        engine.tick()
    assert encoders.encodes == 50 and encoders.shares == 100  # 1 encode, 2 reuses a tick
    assert all(a is b for a, b in zip(sent[0], sent[1], strict=True))  # the same packets
    assert seats[3].own_encodes == 50 and seats[4].own_encodes == 50
    assert seats[0].own_encodes == seats[1].own_encodes == seats[2].own_encodes == 0
    levels = []
    for out in sent:
        audio = decode(out)[4800:]
        assert abs(fft_peak_hz(audio, 48000) - 700) < 5
        levels.append(rms_dbfs(audio))
    assert abs(levels[0] - levels[3]) < 1.0 and abs(levels[0] - levels[4] - 6.0) < 1.5
