"""A console in a talkgroup: one engine Port per (console, talkgroup) it joins.

Each joined talkgroup is its own WebRTC peer connection and its own Port, so the
engine's floor, N-1 mix, TOT and audit work for a console exactly as for a radio,
and the page can set each talkgroup's volume on its own audio track. The
console's PTT arrives on the event WebSocket and only sets :attr:`ptt`; the
engine reads it on the next tick, so releasing PTT frees the floor within one
tick plus network time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from gateway.config import PortConfig, Timing
from gateway.ports import Frame, Port, PortBank
from gateway.webrtc.audio import OPUS_TIME_BASE, SIDES, Inbound, OpusStream, SharedEncoders
from gateway.webrtc.rtp import RtpOut

log = logging.getLogger(__name__)

MAX_QUEUED_PACKETS = 10  # 200 ms: a stalled sender drops old audio instead of lagging
STALE_GAP_S = 0.1


class OutboundTrack(MediaStreamTrack):
    """Pre-encoded Opus packets to the browser; aiortc's sender only packetises them."""

    kind = "audio"

    def __init__(self, samples_per_packet: int) -> None:
        super().__init__()
        self.samples = samples_per_packet
        self.queue: deque[bytes] = deque(maxlen=MAX_QUEUED_PACKETS)
        self.ready = asyncio.Event()
        self.pts = 0
        self.packets = 0
        self.bytes = 0

    def push(self, payload: bytes) -> None:
        self.queue.append(payload)
        self.ready.set()

    async def recv(self) -> av.Packet:
        while not self.queue:
            if self.readyState != "live":
                raise MediaStreamError
            self.ready.clear()
            await self.ready.wait()
        payload = self.queue.popleft()
        packet = av.Packet(payload)
        packet.pts = self.pts
        packet.time_base = OPUS_TIME_BASE
        self.pts += self.samples
        self.packets += 1
        self.bytes += len(payload)
        return packet

    def stop(self) -> None:
        super().stop()
        self.ready.set()


class ConsolePort(Port):
    """A dispatcher's seat in one talkgroup."""

    kind = "console"
    can_transmit = True
    # One per (page, talkgroup): no per-port metric series (they would grow with every
    # session and name operators); /metrics counts positions per talkgroup instead.
    per_call = True

    def __init__(
        self,
        name: str,
        timing: Timing,
        *,
        operator: str,
        display: str,
        agency: str,
        talkgroup: str,
        may_talk: bool,
        priority: int,
        encoders: SharedEncoders,
        silence: bytes,
        tick: Callable[[], int],
        shared_encode: bool = True,
        bank: PortBank | None = None,
        dtx: bool = True,
    ) -> None:
        config = PortConfig(
            kind="console",
            agency=agency,
            duplex="full",
            ptt_hang_time=0.0,
            description=f"dispatcher console of {operator}",
        )
        super().__init__(name, config, timing)
        self.operator = operator
        self.display = display
        self.talkgroup = talkgroup
        self.can_talk = may_talk
        self.priority = priority
        self.emergency = False
        self.ptt = False
        self.encoders = encoders
        self.shared_encode = shared_encode
        self.dtx = dtx  # may pause during silence (only with our own RTP path)
        self.silence = silence
        self.tick = tick
        self.frame_seconds = timing.frame
        self.inbound = Inbound(self.rate, self.frame_samples)
        self.track = OutboundTrack(round(48000 * timing.frame))
        self.own: OpusStream | None = None
        self.stereo = False  # the page decodes stereo (stereo=1 in its offer)
        self.side = "both"  # both ears, or only "left" / "right" (needs stereo)
        self.direct: RtpOut | None = None  # set by use_direct() once the call is answered
        self.emit: Callable[[bytes], None] = self.track.push  # one Opus packet to the browser
        self.port_bank = bank  # the bank moves every console's audio in one step per tick
        self.reader: asyncio.Task | None = None
        self.frames_in = 0
        self.stale_frames = 0
        self.own_encodes = 0

    def set_side(self, side: str) -> bool:
        """Route this talkgroup to one ear or both; False if the page cannot (mono)."""
        if side not in SIDES or (side != "both" and not self.stereo):
            return False
        if side != self.side:
            self.side = side
            self.own = None  # its own encoder (N-1 mix, busy tone) follows the side too
            if self.port_bank is not None:
                self.port_bank.replan()  # type: ignore[attr-defined]
        return True

    def use_direct(self, rtp: RtpOut | None) -> None:
        """Send through ``rtp`` (our own RTP/SRTP path) instead of aiortc's sender."""
        self.direct = rtp
        self.emit = rtp.send if rtp is not None else self.track.push

    # --- browser side --------------------------------------------------------

    def start_reading(self, track: MediaStreamTrack) -> None:
        """Drain the browser's audio track for as long as the call lasts."""
        self.reader = asyncio.ensure_future(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        last_pts: int | None = None
        last_arrival = 0.0
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                now = loop.time()
                self.frames_in += 1
                # The page stops sending between overs; the first packet of the next
                # over releases the previous over's tail from aiortc's jitter buffer.
                # That tail (contiguous timestamps after a long silence) is stale.
                stale = (
                    last_pts is not None
                    and frame.pts == last_pts + frame.samples
                    and now - last_arrival > STALE_GAP_S
                )
                last_pts, last_arrival = frame.pts, now
                if stale:
                    self.stale_frames += 1
                elif self.ptt:  # audio while PTT is up goes nowhere: do not spend on it
                    self.inbound.push(frame)

    def set_ptt(self, on: bool) -> None:
        if on and not self.ptt:
            self.inbound.clear()  # start the over with fresh audio, not what was queued
        self.ptt = on and self.can_talk

    # --- engine side ---------------------------------------------------------

    def read(self) -> Frame | None:
        self.talking = self.ptt
        if not self.talking:
            return None
        return self.inbound.pop()

    def write(self, frame: Frame | None) -> None:
        """One port at a time (no bank): the same packets the bank would send."""
        if frame is None:
            self.emit(self.silence)
            return
        packets = None
        if self.shared_encode and not self.talking:
            packets = self.encoders.packets(self.talkgroup, self.tick(), frame, self.side)
        if packets is None:
            self.write_own(frame)
            return
        for payload in packets:
            self.emit(payload)

    def write_own(self, frame: Frame) -> None:
        """Encode a frame only this console hears (its N-1 mix, the busy tone)."""
        if self.own is None:
            self.own = OpusStream(self.rate, self.frame_seconds, self.encoders.bitrate, self.side)
        self.own_encodes += 1
        for payload in self.own.encode(frame):
            self.emit(payload)

    def close(self) -> None:
        super().close()
        self.ptt = False
        self.emit = _closed
        self.track.stop()
        if self.direct is not None:
            self.direct.close()
        if self.reader is not None:
            self.reader.cancel()

    @property
    def label(self) -> str:
        """Who-is-talking, the audit log and MQTT show the operator's display name."""
        return self.display

    def stats(self) -> dict[str, float]:
        out = self.direct or self.track
        return {
            "packets_in": float(self.frames_in),
            "packets_out": float(out.packets),
            "bytes_out": float(out.bytes),
        }


def _closed(payload: bytes) -> None:
    """A closed console sends nothing."""
