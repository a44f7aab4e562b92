"""Recorder ports: what a talkgroup carries, kept as WAV files a records officer can find.

- Every start of the port, every UTC hour (``split = "hour"``) or every over
  (``split = "over"``) gets a new file in ``directory``, named after the talkgroup
  and the UTC time of its first sample: ``marine-20261206T160000Z.wav``. A file is
  created with O_EXCL (a name already taken gets ``-1``, ``-2``…), so a restart or a
  reload never writes over a recording.
- Python's ``wave`` rewrites the header after every block it writes, so even a
  killed gateway leaves a file whose header gives its length; a stop, a reload or a
  fault closes the file.
- ``keep_days`` deletes this talkgroup's recordings older than that (checked when a
  file starts, at most hourly, in a worker thread: a big directory takes a while).
- Every file started, finished or deleted is logged and audited
  (``recording_start``, ``recording_stop``, ``recording_deleted``).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
import wave
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gateway.codecs.pcm import float_to_int16
from gateway.config import RecorderConfig, Timing
from gateway.ports import Frame, Port

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0


def file_prefix(talkgroup: str) -> str:
    """A talkgroup name made safe for a file name (config keys may hold '/' or spaces)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", talkgroup) or "recording"


class Recorder(Port):
    """Writes what the talkgroup carries to 16-bit WAV files at the internal rate."""

    can_talk = False

    def __init__(self, name: str, config: RecorderConfig, timing: Timing) -> None:
        super().__init__(name, config, timing)
        self.directory = Path(config.directory)
        self.now = time.time
        self._file: BinaryIO | None = None
        self._wav: wave.Wave_write | None = None
        self._path: Path | None = None
        self._hour = -1  # UTC hour the open file belongs to (split = "hour")
        self._quiet = 0  # samples of silence held back since the last audio (split = "over")
        self._frames = 0  # samples in the open file
        self._silence = np.zeros(self.frame_samples, np.float32)
        self._pruned_at = -PRUNE_EVERY_S
        self._deleted: queue.SimpleQueue[str] = queue.SimpleQueue()

    def open(self) -> None:
        """Check the directory now, so a recorder that cannot record is down from the start."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(f"{self.directory}: this user may not write there")

    def write(self, frame: Frame | None) -> None:
        while not self._deleted.empty():
            self.report("recording_deleted", talkgroup=self.talkgroup, file=self._deleted.get())
        if self.config.split == "over":
            self._write_over(frame)
        else:
            self._write_hour(frame)

    def _write_hour(self, frame: Frame | None) -> None:
        if frame is None and not self.config.continuous:
            return
        now = self.now()
        if self._wav is not None and int(now // 3600) != self._hour:
            self._finish()
        if self._wav is None:
            self._start(now)
            self._hour = int(now // 3600)
        self._append(self._silence if frame is None else frame)

    def _write_over(self, frame: Frame | None) -> None:
        """One file per over; a pause shorter than ``over_gap`` stays inside the over."""
        if frame is None:
            if self._wav is not None:
                self._quiet += self.frame_samples
                if self._quiet >= self.config.over_gap * self.rate:
                    self._finish()
            return
        if self._wav is None:
            self._start(self.now())
        elif self._quiet:
            self._append(np.zeros(self._quiet, np.float32))
        self._quiet = 0
        self._append(frame)

    def _append(self, audio: np.ndarray) -> None:
        assert self._wav is not None
        self._wav.writeframes(float_to_int16(audio).astype("<i2").tobytes())
        self._frames += len(audio)

    def _start(self, now: float) -> None:
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
        base = f"{file_prefix(self.talkgroup or self.name)}-{stamp}"
        for n in range(1000):
            path = self.directory / f"{base}{f'-{n}' if n else ''}.wav"
            try:
                self._file = open(path, "xb")  # noqa: SIM115  (held open while recording)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"{self.directory}: 1000 recordings named {base}*")
        self._path = path
        self._frames = 0
        self._wav = wave.open(self._file, "wb")  # noqa: SIM115
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(self.rate)
        self.report("recording_start", talkgroup=self.talkgroup, file=str(path))
        if self.config.keep_days and now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            threading.Thread(target=self._prune, args=(now,), daemon=True).start()

    def _finish(self) -> None:
        """Close the open file (the header then holds its final length) and say so."""
        wav, file, path = self._wav, self._file, self._path
        self._wav = self._file = self._path = None
        self._quiet = 0
        if wav is None or file is None:
            return
        try:
            wav.close()
        finally:
            file.close()
        self.report(
            "recording_stop",
            talkgroup=self.talkgroup,
            file=str(path),
            duration_seconds=round(self._frames / self.rate, 3),
        )

    def _prune(self, now: float) -> None:
        """Delete this talkgroup's recordings older than ``keep_days`` (a worker thread)."""
        cutoff = now - self.config.keep_days * 86400
        prefix = file_prefix(self.talkgroup or self.name)
        for path in self.directory.glob(f"{prefix}-*.wav"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    self._deleted.put(str(path))  # reported by the tick, on the loop
            except OSError as exc:
                log.warning("recording %s not deleted: %s", path, exc)

    def close(self) -> None:
        super().close()
        self._finish()
