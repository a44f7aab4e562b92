"""Opus (RFC 6716, RTP payload RFC 7587) for one leg: encoder, decoder, and in-band FEC.

Why per leg, when G.711 is one table lookup for every leg at once: Opus is stateful
(each packet is predicted from the ones before), so each leg has its own encoder and
decoder, run once per tick by the leg bank (:mod:`gateway.sip.bank_opus`). Only links
between BorderLinks use it: wideband speech (the engine's 16 kHz, where G.711 stops
at 4 kHz) and in-band FEC, a low-rate copy of packet *n* carried in packet *n + 1*,
so a lost packet whose successor is already in hand is decoded from it instead of
made up. (SILK sends FEC only for frames its voice detector finds active: speech, not
a steady test tone, which it soon takes for background noise.)

The binding is ``opuslib_next`` (ctypes over the system's libopus): PyAV's Opus
decoder, used by the console, cannot ask libopus for a packet's FEC data
(``opus_decode(..., decode_fec=1)``).

A silent frame is not encoded: it goes as a one-byte packet (a TOC byte and a frame of
no bytes, RFC 6716 §3.2.1: "DTX"), and a receiver plays silence for it without
decoding. So a hundred idle shared talkgroups cost neither side an encode or a decode,
while each packet still carries the talker extension and keeps the RTP clock going.
After such a pause both ends start their codec state afresh, so they stay in step.
"""

from __future__ import annotations

import ctypes

import numpy as np

try:
    import opuslib_next
    from opuslib_next.api import libopus as _libopus
    from opuslib_next.exceptions import OpusError
except Exception:  # noqa: BLE001 - no libopus on this machine: links stay on G.711
    opuslib_next = None
    _libopus = None

    class OpusError(Exception):  # type: ignore[no-redef]
        pass


CLOCK = 48000  # RFC 7587: the RTP clock of Opus is always 48 kHz
# Packet times (ms): one packet a tick, so the engine's frame; a=ptime says which, and a
# link agrees on Opus only with a peer whose ptime is ours (sdp.choose_codec).
PACKET_MS = (10, 20)
RATES = (8000, 12000, 16000, 24000, 48000)  # engine rates libopus encodes and decodes at
BITRATE = 32000  # wideband speech with FEC's share on top
LOSS_PERCENT = 10  # what the encoder plans for: FEC kicks in at this expected loss
COMPLEXITY = 3  # CPU per encode against quality: see docs/links.md, figures
REPLAY_SPAN = 4096  # a slot this close behind the last one played is played again (8 kHz)
SILENCE = bytes([9 << 3])  # TOC: SILK wideband 20 ms, mono, one frame of zero bytes (DTX)
SILENCE_10MS = bytes([8 << 3])  # the same at 10 ms (RFC 6716 §3.1: configurations 8 and 9)
FMTP = "useinbandfec=1;maxplaybackrate=16000;sprop-maxcapturerate=16000;stereo=0"

if _libopus is not None:
    _libopus.opus_packet_get_nb_samples.argtypes = (ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32)
    _libopus.opus_packet_get_nb_samples.restype = ctypes.c_int


def available(rate: int, frame_seconds: float) -> bool:
    """Opus can run with this engine on this machine: libopus found, a rate it takes, and
    10 or 20 ms frames (one packet a tick)."""
    ms = round(frame_seconds * 1000)
    return opuslib_next is not None and rate in RATES and ms in PACKET_MS


def silence(packet_ms: int) -> bytes:
    """The one-byte DTX packet for this packet time."""
    return SILENCE_10MS if packet_ms == 10 else SILENCE


def has_fec(payload: bytes) -> bool:
    """Whether an Opus packet carries in-band FEC (SILK's LBRR data) for the packet before it.

    A packet after a pause, or from an encoder that chose not to, carries none: decoding
    its "FEC" would be libopus concealing, and must not be counted as a recovery. The
    flag is the second bit of the frame (RFC 6716 §4.2.3: the VAD flag, then the LBRR
    flag, each the first binary symbols of the range coder, so plain bits — libopus
    1.5's ``opus_packet_has_lbrr`` reads it so; Debian 12's libopus 1.3 lacks it). Read
    for what a BorderLink sends — one 10 or 20 ms mono SILK or hybrid frame (TOC code 0);
    any other packet is taken as carrying none."""
    if len(payload) < 2:
        return False
    toc = payload[0]
    if toc >> 3 >= 16 or toc & 0x07:  # CELT only (no LBRR), stereo, or several frames
        return False
    return bool(payload[1] & 0x40)


def packet_samples(payload: bytes) -> int:
    """Samples at 48 kHz in an Opus packet; negative when its TOC/frame count is invalid."""
    if len(payload) == 0:
        return -1
    return int(_libopus.opus_packet_get_nb_samples(payload, len(payload), CLOCK))


class OpusLeg:
    """One leg's encoder and decoder at the engine rate, and the packets it holds.

    ``waiting`` holds the received packets by RTP time (in 8 kHz units, the jitter
    bank's clock), until the jitter bank plays their slot; see :meth:`play`."""

    def __init__(self, rate: int, frame: int) -> None:
        self.rate = rate
        self.frame = frame  # samples per packet (the engine's frame) at the engine rate
        self.silence = silence(round(1000 * frame / rate))
        self.encoder = opuslib_next.Encoder(rate, 1, "voip")
        self.encoder.bitrate = BITRATE
        self.encoder.inband_fec = 1
        self.encoder.packet_loss_perc = LOSS_PERCENT
        self.encoder.complexity = COMPLEXITY
        self.encoder.signal = opuslib_next.SIGNAL_VOICE
        self.decoder = opuslib_next.Decoder(rate, 1)
        self.waiting: dict[int, bytes] = {}
        self.quiet_out = True  # the last frame we sent was silence: restart the encoder
        self.quiet_in = True  # the last frame we played was the peer's silence
        self.played: int | None = None  # the last slot played (its packet is gone)
        self.fec_recovered = 0  # frames decoded from the next packet's FEC data
        self.undecodable = 0  # packets libopus refused (counted malformed by the bank)

    # --- send -----------------------------------------------------------------------------

    def encode(self, frame: np.ndarray) -> bytes:
        """One frame (float32 at the engine rate) as an Opus packet."""
        if not frame.any():
            self.quiet_out = True
            return self.silence
        if self.quiet_out:
            self.encoder.reset_state()
            self.quiet_out = False
        pcm = np.ascontiguousarray(frame, np.float32).tobytes()
        return self.encoder.encode_float(pcm, len(frame))

    # --- receive --------------------------------------------------------------------------

    def hold(self, slot: int, payload: bytes) -> None:
        """A packet for RTP time ``slot`` (8 kHz units, mod 2³²), until it is played."""
        waiting = self.waiting
        waiting[slot] = payload
        if len(waiting) > 32:  # a ring's worth (the jitter bank holds 25 packets): the oldest go
            del waiting[next(iter(waiting))]

    def play(self, slot: int, step: int, recent: bool) -> tuple[np.ndarray | None, str]:
        """The frame for RTP time ``slot``: (samples or None for silence, what happened).

        What happened: "packet" (decoded), "silence" (the peer's silence, or nothing to
        conceal), "fec" (made from the next packet, ``step`` later), "plc" (concealed:
        libopus extrapolates), "bad" (a packet libopus refused, concealed instead)."""
        payload = self.waiting.pop(slot, None)
        self._forget_before(slot)
        # The jitter bank stepped back (it grew to cover more jitter): this slot was played
        # already, so the gap is made up (concealed), not a lost packet rebuilt.
        again = self.played is not None and ((self.played - slot) & 0xFFFFFFFF) < REPLAY_SPAN
        if not again:
            self.played = slot
        if payload is None:
            if self.quiet_in or not recent:
                return None, "silence"
            following = self.waiting.get((slot + step) & 0xFFFFFFFF)
            if following is not None and has_fec(following) and not again:
                try:
                    pcm = self.decoder.decode_float(following, self.frame, decode_fec=True)
                except OpusError:
                    return self._conceal(), "plc"
                self.fec_recovered += 1
                return np.frombuffer(pcm, np.float32), "fec"
            return self._conceal(), "plc"
        if len(payload) <= 1:
            self.quiet_in = True
            return None, "silence"
        if self.quiet_in:
            self.decoder.reset_state()
            self.quiet_in = False
        try:
            pcm = self.decoder.decode_float(payload, self.frame, decode_fec=False)
        except OpusError:
            self.undecodable += 1
            return self._conceal(), "bad"
        samples = np.frombuffer(pcm, np.float32)
        if len(samples) != self.frame:  # not one of our frames after all: not ours to play
            self.undecodable += 1
            return self._conceal(), "bad"
        return samples, "packet"

    def _conceal(self) -> np.ndarray | None:
        try:
            return np.frombuffer(self.decoder.decode_float(b"", self.frame, False), np.float32)
        except OpusError:
            return None

    def _forget_before(self, slot: int) -> None:
        """Packets for slots already played are never played: drop them."""
        waiting = self.waiting
        if waiting:
            for old in [k for k in waiting if ((k - slot) & 0xFFFFFFFF) >= 0x80000000]:
                del waiting[old]

    def reset(self) -> None:
        """The peer's stream started again (new SSRC, a jump in time)."""
        self.waiting.clear()
        self.quiet_in = True
        self.played = None
