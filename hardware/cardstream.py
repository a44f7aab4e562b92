"""A sound card's stream as the tick sees it: its process, its two rings, its health.

The stream runs in a process of its own (``card_process``: the callback must never
wait for the gateway's GIL), which shares a block of memory with the gateway: a
capture ring, a playback ring, the callback's counters and the time of its last call.
A card that stops calling back (unplugged, audio server gone) is reported by
:attr:`CardStream.up` going False; its process is killed, and a new one is started
with backoff on a thread of the card's own until the device is back. Each stream
started bumps :attr:`CardStream.generation`, so the tick starts its side afresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .card_process import (
    FINISHED,
    FRAMES,
    RX_DROPPED,
    TOTAL,
    TX_UNDERRUNS,
    XRUNS,
    CardBlock,
    CardProcess,
    Opened,
    OpenRequest,
    jack_client_name,
)
from .ring import SharedRing

log = logging.getLogger(__name__)

STALL_S = 0.3  # no callback for this long (≫ any period): the card is gone
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0  # a vanished device is looked for at least this often
DEFAULT_RATE = 48000  # until the card has told its own
DEFAULT_PERIOD = 256  # until the card has called back
# The card's cycle is the lower envelope of its callbacks' stamps over this many ticks
# (a callback can come late, never early): one punctual callback in the last second
# places it. A crystal 500 ppm off moves it 0.5 ms in that second.
CYCLE_TICKS = 50
SETTLE_S = 0.25  # a new stream's first callbacks only place its cycle (and are dropped)


@dataclass
class CardSpec:
    """Which device and how to open it; the card's process finds it afresh at each (re)open."""

    device: str | int  # index, or a piece of the name
    host_api: str | None = None
    sample_rate: int | None = None  # None: the card's default
    input_channels: int = 1  # opened on the device (the radio's channel is one of them)
    output_channels: int = 1
    input_channel: int = 0  # 0-based
    output_channel: int = 0
    blocksize: int = 0  # 0: whatever the audio server's period is (lowest latency)
    latency: float | str = "low"
    margin: float = 0.001  # seconds each FIFO keeps beyond a period, for jitter
    max_ppm: float = 500.0

    def request(self, port: str) -> OpenRequest:
        return OpenRequest(
            self.device,
            self.host_api,
            self.input_channels,
            self.output_channels,
            self.input_channel,
            self.output_channel,
            self.sample_rate,
            self.blocksize,
            self.latency,
            jack_client_name(port),
        )


class CardStream:
    """One card's stream process and shared block; reopened by itself when it is lost."""

    def __init__(self, spec: CardSpec, name: str) -> None:
        self.spec, self.name = spec, name
        self.up = False
        self.lost = False  # down since a loss; cleared (and the port told) when it is back
        self.error = ""
        self.rate = spec.sample_rate or DEFAULT_RATE
        self.generation = 0  # streams started so far
        # when the stream's frame 0 was due, as each of the last ticks' stamps tells it
        self.origins: deque[float] = deque(maxlen=CYCLE_TICKS)
        self.block = CardBlock()
        self.process = CardProcess(self.block)
        self.now: Callable[[], float] = time.monotonic  # (the drift tests run simulated time)
        # Counts of streams past (the callback's own counters restart with each process).
        self.counts = {"xruns": 0, "dropped_samples": 0, "device_errors": 0, "reopens": 0}
        self.on_state: Callable[[bool, str], None] | None = None
        self._lock = threading.Lock()
        self._retry: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def rx(self) -> SharedRing:
        return self.block.rx

    @property
    def tx(self) -> SharedRing:
        return self.block.tx

    @property
    def status(self) -> np.ndarray:
        return self.block.status

    @property
    def period(self) -> float:
        """Seconds per callback, as the card last called back with."""
        frames = int(self.status[FRAMES]) or self.spec.blocksize or DEFAULT_PERIOD
        return frames / self.rate

    @property
    def tx_underruns(self) -> int:
        """Times this stream's playback ring ran dry (once per run dry)."""
        return int(self.status[TX_UNDERRUNS])

    # --- open / close ---------------------------------------------------------

    def open(self) -> None:
        """Start the card's process and stream; raises naming why if the device cannot open."""
        self._closing.clear()
        if self.block.closed:
            self.block = CardBlock()
            self.process = CardProcess(self.block)
        self._started(self.process.start(self.spec.request(self.name)))

    def _started(self, opened: Opened) -> None:
        """The stream runs, on fresh, empty rings."""
        self.rate = opened.rate
        self.origins.clear()
        self.generation += 1
        self.error = ""
        self.up = True
        log.info("%s: sound card open: %s, %d Hz", self.name, opened.card, opened.rate)

    def close(self) -> None:
        self._closing.set()
        self.up = False
        if self._retry is not None and self._retry is not threading.current_thread():
            self._retry.join(timeout=RETRY_MAX_S)
        self.process.stop()
        if not self.block.closed:
            self._keep_counts()
            self.block.close()

    def _keep_counts(self) -> None:
        """Add an ended stream's counters to the card's, before a new one restarts them."""
        s = self.status
        self.counts["xruns"] += int(s[XRUNS])
        self.counts["dropped_samples"] += int(s[RX_DROPPED])
        s[XRUNS] = s[RX_DROPPED] = 0

    # --- the tick (engine's thread) ---------------------------------------------

    def check(self) -> bool:
        """Is the card alive? Detects a vanished device and starts reopening it.

        Shared memory only, no system call per tick: a process that died stops calling
        back too, and is asked after only once the callbacks have stopped."""
        if not self.up:
            return False
        block = self.block
        if self.now() - float(block.clock[0]) > STALL_S or block.status[FINISHED]:
            self.lost_because(self._why())
            return False
        return True

    def _why(self) -> str:
        if self.status[FINISHED]:
            return "stream stopped by the audio system"
        if not self.process.alive:
            return "the card's process ended"
        return f"no audio callbacks for {STALL_S:.1f}s"

    @property
    def settled(self) -> bool:
        """Has this stream called back long enough for its cycle to be known?"""
        return int(self.status[TOTAL]) >= SETTLE_S * self.rate

    def place(self, frame: int, when: float, period: float) -> float:
        """When the callback stamped (``frame``, ``when``) was due on the card's cycle:
        the lower envelope of the stamps over the last ticks (a callback can be late,
        never early), and never more than one ``period`` (seconds) before its stamp (a
        stream whose clock runs far off the wall clock, as an audio server starved of CPU
        does, moves its cycle faster than the envelope follows)."""
        start = frame / self.rate
        self.origins.append(when - start)
        return max(min(self.origins) + start, when - period)

    def resync(self) -> None:
        """Forget the cycle learnt so far: the audio server lost cycles, or the card came
        late and a FIFO ran dry; the next stamp places the cycle afresh."""
        self.origins.clear()

    # --- loss and reopening ----------------------------------------------------

    def lost_because(self, reason: str) -> None:
        """The card is gone (or did not open): mark it down, reopen it with backoff."""
        self.up = False
        self.lost = True
        self.error = reason
        self.counts["device_errors"] += 1
        log.warning("%s: sound card lost (%s); reopening with backoff", self.name, reason)
        if self.on_state:
            self.on_state(False, reason)
        if self._retry is None or not self._retry.is_alive():
            self._retry = threading.Thread(
                target=self._reopen, daemon=True, name=f"reopen-{self.name}"
            )
            self._retry.start()

    def _reopen(self) -> None:
        self.process.kill()  # a stream stuck in a dead server is never waited for
        self._keep_counts()
        wait = RETRY_FIRST_S
        while not self._closing.wait(wait):
            try:
                opened = self.process.start(self.spec.request(self.name))
            except (OSError, LookupError) as exc:
                log.info("%s: sound card not back yet: %s", self.name, exc)
                wait = min(RETRY_MAX_S, wait * 2)
                continue
            if self._closing.is_set():
                self.process.stop()  # close() came while this one was starting
                return
            self._started(opened)
            self._back()
            return

    def _back(self) -> None:
        """The card is open again after a loss: count, log and tell the port, once per loss."""
        with self._lock:
            if not self.lost:
                return
            self.lost = False
        self.counts["reopens"] += 1
        log.warning("%s: sound card is back", self.name)
        if self.on_state:
            self.on_state(True, "reopened")

    def stats(self) -> dict[str, float]:
        counts = dict(self.counts)
        if not self.block.closed:  # the running stream's own counts, not yet kept
            counts["xruns"] += int(self.status[XRUNS])
            counts["dropped_samples"] += int(self.status[RX_DROPPED])
        return {k: float(v) for k, v in counts.items()}
