"""Instant recall: the last overs of a talkgroup, in memory only, for a dispatcher to replay.

A dispatcher who missed a call asks "say again?" on the air; instant recall lets
them replay it instead. Where a talkgroup sets ``instant_recall = "10min"`` (off by
default: it is a recording, and privacy rules differ per agency), the console
attaches one listening port to it. The port hears exactly what a console hears
(the talkgroup's mix, patches included) and cuts it into clips at pauses, as the
recorder's ``split = "over"`` does. Clips live in memory only, are dropped when
older than the talkgroup's setting, and are capped in count and length, so a
talkgroup that never stops talking cannot grow the gateway's memory.
"""

from __future__ import annotations

import io
import itertools
import time
import wave
from dataclasses import dataclass, field

import numpy as np

from gateway.config import PortConfig, Timing
from gateway.ports import Frame, Port

MAX_CLIPS = 20  # per talkgroup, as many as the tile's talk history shows
MAX_CLIP_SECONDS = 60.0  # an over longer than this is cut (the TOT usually ends it first)
GAP_SECONDS = 0.5  # a pause this long ends a clip


@dataclass
class Clip:
    id: int
    start: float  # epoch seconds of the first audible frame
    chunks: list[np.ndarray] = field(default_factory=list)  # int16 frames
    samples: int = 0

    def seconds(self, rate: int) -> float:
        return self.samples / rate


class RecallPort(Port):
    """Listens to one talkgroup and keeps its recent overs as clips."""

    kind = "recall"
    can_talk = False
    per_call = True  # not a radio: no metric series of its own

    def __init__(self, talkgroup: str, keep: float, timing: Timing) -> None:
        config = PortConfig(
            kind="recall",
            label="instant recall",
            ptt_hang_time=0.0,
            description=f"instant recall of {talkgroup}",
        )
        super().__init__(f"recall@{talkgroup}", config, timing)
        self.talkgroup = talkgroup
        self.keep = keep
        self.now = time.time
        self.clips: list[Clip] = []  # closed clips, newest first
        self.current: Clip | None = None
        self._quiet = 0
        self._ids = itertools.count(1)

    def read(self) -> Frame | None:
        return None

    def write(self, frame: Frame | None) -> None:
        now = self.now()
        if frame is not None:
            if self.current is None:
                self.current = Clip(next(self._ids), now)
            pcm = np.clip(frame * 32767.0, -32768, 32767).astype(np.int16)
            self.current.chunks.append(pcm)
            self.current.samples += len(pcm)
            self._quiet = 0
            if self.current.samples >= MAX_CLIP_SECONDS * self.rate:
                self._close()
        elif self.current is not None:
            self._quiet += self.frame_samples
            if self._quiet >= GAP_SECONDS * self.rate:
                self._close()
        if self.clips and self.clips[-1].start < now - self.keep:
            self.clips = [c for c in self.clips if c.start >= now - self.keep]

    def _close(self) -> None:
        self.clips.insert(0, self.current)
        del self.clips[MAX_CLIPS:]
        self.current = None

    def listing(self) -> list[dict[str, float]]:
        """What the tile shows: each clip's id, start time and length."""
        return [
            {"id": c.id, "start": round(c.start, 1), "seconds": round(c.seconds(self.rate), 1)}
            for c in self.clips
        ]

    def wav(self, clip_id: int) -> tuple[bytes, float] | None:
        """One clip as a 16-bit mono WAV at the engine rate (None: gone or never was)."""
        clip = next((c for c in self.clips if c.id == clip_id), None)
        if clip is None or clip.start < self.now() - self.keep:
            return None
        out = io.BytesIO()
        with wave.open(out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.rate)
            w.writeframes(np.concatenate(clip.chunks).tobytes())
        return out.getvalue(), clip.seconds(self.rate)
