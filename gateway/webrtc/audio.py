"""Audio at the console's edge: engine frames ↔ Opus at 48 kHz.

WebRTC carries Opus with a 48 kHz RTP clock; the engine runs at its own rate
(16 kHz by default). Resampling happens here, once per stream, with the
low-latency sinc resampler (1.5 ms each way, where soxr HQ costs 36 ms).

Encoding is the expensive per-listener step, so a talkgroup's mix is encoded
once per tick by a :class:`SharedEncoders` entry and the same packet is handed
to every console that is only listening (as Asterisk's softmix does); only a
console that is talking in a ``mix`` talkgroup (it hears everyone but itself)
or hears the busy tone needs an encoder of its own.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from gateway.codecs.pcm import float_to_int16, int16_to_float
from gateway.codecs.resample import LOW_LATENCY, StreamResampler

OPUS_RATE = 48000
OPUS_TIME_BASE = Fraction(1, OPUS_RATE)
SIDES = ("both", "left", "right")  # where a console hears a talkgroup


class OpusStream:
    """One Opus encoder fed with engine frames; returns the packets they complete.

    ``side`` "both" encodes mono (heard in both ears); "left" or "right" encodes
    stereo with the audio in that channel only."""

    def __init__(
        self, rate: int, frame_seconds: float, bitrate: int = 32000, side: str = "both"
    ) -> None:
        self.resampler = StreamResampler(rate, OPUS_RATE, LOW_LATENCY)
        self.samples = round(OPUS_RATE * frame_seconds)
        self.channel = SIDES.index(side) - 1  # -1 mono, 0 left, 1 right
        self.layout = "mono" if self.channel < 0 else "stereo"
        codec = av.CodecContext.create("libopus", "w")
        codec.sample_rate = OPUS_RATE
        codec.layout = self.layout
        codec.format = "s16"
        codec.bit_rate = bitrate
        codec.time_base = OPUS_TIME_BASE
        codec.options = {"application": "voip", "frame_duration": f"{frame_seconds * 1000:g}"}
        self.codec = codec
        self.pending = np.zeros(0, np.float32)
        self.pts = 0
        self.encoded = 0  # frames encoded, for the benchmark and stats

    def encode(self, frame: np.ndarray) -> list[bytes]:
        """Resample one engine frame and encode every whole Opus frame now available."""
        audio = self.resampler.process(frame)
        if self.pending.size:
            audio = np.concatenate((self.pending, audio))
        packets: list[bytes] = []
        start = 0
        while len(audio) - start >= self.samples:
            chunk = float_to_int16(audio[start : start + self.samples])
            start += self.samples
            if self.channel >= 0:  # interleaved L R L R…, the other ear silent
                both = np.zeros((self.samples, 2), np.int16)
                both[:, self.channel] = chunk
                chunk = both
            av_frame = av.AudioFrame.from_ndarray(
                chunk.reshape(1, -1), format="s16", layout=self.layout
            )
            av_frame.sample_rate = OPUS_RATE
            av_frame.pts = self.pts
            self.pts += self.samples
            packets.extend(bytes(p) for p in self.codec.encode(av_frame))
            self.encoded += 1
        self.pending = audio[start:]
        return packets


def silence_packet(frame_seconds: float) -> bytes:
    """A steady-state Opus packet of digital silence (a few dozen bytes)."""
    stream = OpusStream(OPUS_RATE, frame_seconds)
    silence = np.zeros(stream.samples, np.float32)
    packets: list[bytes] = []
    for _ in range(10):
        packets = stream.encode(silence) or packets
    return packets[-1]


class SharedEncoders:
    """One Opus stream per talkgroup mix (and side), encoded at most once per tick.

    A listener's frame is shared only if it is bit-identical to the frame encoded
    for this tick (same mix, same gain, same limiter state); otherwise the caller
    falls back to its own encoder, so sharing can never send anyone the wrong mix.
    """

    def __init__(self, rate: int, frame_seconds: float, bitrate: int) -> None:
        self.rate = rate
        self.frame_seconds = frame_seconds
        self.bitrate = bitrate
        self.streams: dict[str, _Shared] = {}
        self.encodes = 0
        self.shares = 0

    def encode(
        self, key: str, tick: int, frame: np.ndarray, listeners: int = 1, side: str = "both"
    ) -> list[bytes]:
        """This tick's packets of ``key``'s mix, encoded on the first call of the tick.

        The caller has checked that ``listeners`` consoles hear exactly ``frame``.
        """
        shared = self._stream(key, side)
        if shared.tick != tick:
            shared.tick = tick
            shared.frame = frame.tobytes()
            shared.packets = shared.stream.encode(frame)
            self.encodes += 1
            listeners -= 1
        self.shares += listeners
        return shared.packets

    def packets(
        self, key: str, tick: int, frame: np.ndarray, side: str = "both"
    ) -> list[bytes] | None:
        """One console's share of this tick's encode, or None if its frame differs."""
        shared = self._stream(key, side)
        if shared.tick != tick:
            return self.encode(key, tick, frame, side=side)
        if frame.tobytes() == shared.frame:  # a memcmp: cheaper than np.array_equal
            self.shares += 1
            return shared.packets
        return None

    def _stream(self, key: str, side: str) -> _Shared:
        name = key if side == "both" else f"{key}|{side}"
        shared = self.streams.get(name)
        if shared is None:
            stream = OpusStream(self.rate, self.frame_seconds, self.bitrate, side)
            shared = self.streams[name] = _Shared(stream)
        return shared


class _Shared:
    def __init__(self, stream: OpusStream) -> None:
        self.stream = stream
        self.tick = -1
        self.frame = b""  # the encoded frame's bytes, to check that another frame is identical
        self.packets: list[bytes] = []


class Inbound:
    """Decoded browser audio → engine frames, with a bounded FIFO.

    The browser's clock and ours differ slightly and packets arrive in bursts; the
    FIFO is trimmed to ``max_frames`` so delay can never build up over a shift.
    """

    def __init__(self, rate: int, frame_samples: int, max_frames: int = 3) -> None:
        self.rate = rate
        self.frame_samples = frame_samples
        self.max_samples = max_frames * frame_samples
        self.fifo = np.zeros(0, np.float32)
        self.resamplers: dict[int, StreamResampler] = {}
        self.dropped_samples = 0

    def push(self, frame: av.AudioFrame) -> None:
        data = frame.to_ndarray()
        channels = len(frame.layout.channels)
        mono = data[0] if frame.format.is_planar else data.reshape(-1)[::channels]
        audio = int16_to_float(mono) if mono.dtype == np.int16 else mono.astype(np.float32)
        if frame.sample_rate != self.rate:
            resampler = self.resamplers.get(frame.sample_rate)
            if resampler is None:
                resampler = StreamResampler(frame.sample_rate, self.rate, LOW_LATENCY)
                self.resamplers[frame.sample_rate] = resampler
            audio = resampler.process(audio)
        fifo = np.concatenate((self.fifo, audio))
        excess = len(fifo) - self.max_samples
        if excess > 0:
            self.dropped_samples += excess
            fifo = fifo[excess:]
        self.fifo = fifo

    def pop(self) -> np.ndarray | None:
        """One engine frame, or None when less than a frame has arrived."""
        if len(self.fifo) < self.frame_samples:
            return None
        frame, self.fifo = self.fifo[: self.frame_samples], self.fifo[self.frame_samples :]
        return frame

    def clear(self) -> None:
        self.fifo = self.fifo[:0]
