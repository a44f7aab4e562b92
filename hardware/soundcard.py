"""A radio's sound card, read and written one engine frame at a time: a short chain.

    card stream (process, rings, reopen)  ──capture──▶  ElasticFifo ──▶ read()
                                          ◀─playback──  ElasticFifo ◀── write()
                                        end_of_tick(due): both levels, both PI loops

Each direction's level is taken at the tick's instant (its deadline on the media
clock, ``due``) from the card's last callback time: the audio queued plus (receive)
or minus (transmit) how far the card had gone into its period by then. So measured, the
level neither saw-tooths with the card's periods nor jumps with a late tick. Its target
is one card period plus a margin, whatever the tick's phase against the card's cycle
(the receive FIFO must ride a tick just before a callback, the transmit FIFO one just
after): nothing follows the card's phase, and the engine keeps its own clock. Transmit
holds ``LATE_TICK_S`` more: it must ride a late tick, which a loaded machine has every
few seconds (measured: ``bench/radio_latency.py --load 1``), where receive rides a late
callback, which is rare.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from .card_process import TOTAL
from .cardstream import CardSpec, CardStream
from .elastic import ZERO_CROSSINGS, ElasticFifo

__all__ = ["CardSpec", "SoundCard", "ZERO_CROSSINGS"]
log = logging.getLogger(__name__)

# How late a tick transmit rides without running dry. At normal priority with a CPU hog
# beside (stress-ng --cpu 1), ticks come 5-9 ms late a few times a minute on a 2-core
# machine (a bare asyncio loop as much); one card period more (5.3 ms at 256) was too
# little, and a period is the wrong unit: a tick's lateness has nothing to do with it.
LATE_TICK_S = 0.010


class Playback:
    """The transmit FIFO's store: the card's playback ring (only the card reads it)."""

    def __init__(self, card: SoundCard) -> None:
        self.card = card

    def cut(self, count: int) -> int:
        tx = self.card.stream.tx
        count = min(count, tx.queued)
        tx.ask_skip(count)
        return count

    def pad(self, count: int) -> None:
        self.card.dropped += self.card.stream.tx.push(np.zeros(count, np.float32))


class SoundCard:
    """One radio's card: its stream, a receive FIFO and a transmit FIFO."""

    def __init__(self, spec: CardSpec, rate: int, frame_samples: int, name: str = "card") -> None:
        self.spec, self.rate, self.n, self.name = spec, rate, frame_samples, name
        self.frame_seconds = frame_samples / rate
        self.stream = CardStream(spec, name)
        self.rx = ElasticFifo(None, self.stream.rate, rate, spec.margin, spec.max_ppm)
        # Transmit rides a late tick, which is common (receive rides a late callback, rare).
        self.tx = ElasticFifo(
            Playback(self), rate, self.stream.rate, spec.margin, spec.max_ppm, LATE_TICK_S
        )
        self.generation = 0  # of the stream our side was last started for
        self.tx_underruns_seen = 0
        self.ran_dry = False  # a FIFO ran dry: its refill places the card's cycle afresh
        self.tx_extra = 0.0  # TX delay held in the ring while keyed (seconds)
        self.dropped = 0  # transmit samples that did not fit the ring
        self.silence = np.zeros(frame_samples, np.float32)  # written when the engine sends none

    # --- the stream's life, as the port sees it ----------------------------------

    @property
    def up(self) -> bool:
        return self.stream.up

    @property
    def error(self) -> str:
        return self.stream.error

    @property
    def counts(self) -> dict[str, int]:
        return self.stream.counts

    @property
    def on_state(self) -> Callable[[bool, str], None] | None:
        """Told (up, reason) when the card is lost and when it is back."""
        return self.stream.on_state

    @on_state.setter
    def on_state(self, tell: Callable[[bool, str], None] | None) -> None:
        self.stream.on_state = tell

    def open(self) -> None:
        self.stream.open()

    def close(self) -> None:
        self.stream.close()

    def lost_because(self, reason: str) -> None:
        self.stream.lost_because(reason)

    def _follow_stream(self) -> None:
        """A new stream (fresh, empty rings): our side starts afresh too."""
        self.generation = self.stream.generation
        device = self.stream.rate
        self.rx.restart(device, self.rate)
        self.tx.restart(self.rate, device)
        self.tx_underruns_seen = 0
        self.tx_extra = 0.0

    # --- the tick (engine's thread) ---------------------------------------------

    def read(self) -> np.ndarray | None:
        """One engine frame of received audio, or None (not started, card down)."""
        if not self.stream.check():
            return None
        if self.generation != self.stream.generation:
            self._follow_stream()
        if self.rx.dry:
            return None  # filled at the end of this tick
        frame = np.empty(self.n, np.float32)
        got = self.rx.take(self.stream.block.rx, frame)
        if got < self.n:
            frame[got:] = 0.0
            late = self.stream.now() - float(self.stream.block.clock[0]) - self.stream.period
            self.rx.ran_dry(max(0.0, late))
            self.ran_dry = True
            log.info(
                "%s: rx underrun, the card's last callback %.1f ms overdue; margin now %.1f ms",
                self.name,
                max(0.0, late) * 1000,
                self.rx.margin * 1000,
            )
        return frame

    def write(self, frame: np.ndarray | None) -> None:
        """One engine frame to transmit (None: silence). Call once per tick, after read.
        Until the stream's first callback has set the FIFO's level, nothing is queued."""
        stream = self.stream
        if stream.up and self.generation == stream.generation and not self.tx.dry:
            sent = self.silence if frame is None else frame
            self.dropped += self.tx.push(sent, stream.block.tx)

    def end_of_tick(self, due: float) -> None:
        """After read and write: both FIFOs' levels at the tick's instant ``due`` (its
        deadline, ``time.monotonic()``), and one step of each one's control."""
        stream = self.stream
        if not stream.up or self.generation != stream.generation:
            return
        block = stream.block  # (its views at hand: each of the stream's properties is a call)
        if not block.status[TOTAL]:
            return
        frame, stamp = self.rx.capture(block.rx, block.status, block.clock)
        period = stream.period
        at = stream.place(frame, stamp, period)
        if not stream.settled:  # the first callbacks only place the card's cycle
            self.rx.store.cut(self.rx.waiting)  # (and their audio goes, uncounted)
            return
        underruns = stream.tx_underruns
        if underruns > self.tx_underruns_seen:
            self.tx_underruns_seen = underruns
            late = max(0.0, stream.now() - due)
            self.tx.ran_dry(late)
            self.ran_dry = True
            log.info(
                "%s: tx underrun, the tick that found it %.1f ms late; margin now %.1f ms",
                self.name,
                late * 1000,
                self.tx.margin * 1000,
            )
        on_time = due - at < 1.5 * period  # (the card owes no callback)
        if on_time and self.ran_dry:  # the server may have lost cycles: the cycle as it runs now
            stream.resync()
            at, self.ran_dry = stamp, False
        phase = due - at  # how far into its period the card was at ``due``
        received = self.rx.waiting / self.rate
        queued = block.tx.queued / stream.rate - self.tx_extra
        dt = self.frame_seconds
        self.rx.end_of_tick(received + phase, period, dt, on_time)
        self.tx.end_of_tick(queued - dt + period - phase, period, dt, on_time)

    # --- TX delay --------------------------------------------------------------

    def hold_tx(self, seconds: float) -> None:
        """TX delay: put ``seconds`` of silence ahead of the audio (PTT is already up)."""
        if seconds <= 0 or not self.up:
            return
        self.tx.store.pad(round(seconds * self.stream.rate))
        self.tx_extra = seconds

    def release_tx(self) -> None:
        """PTT is down: drop the TX-delay silence still queued, back to the normal level."""
        extra, self.tx_extra = self.tx_extra, 0.0
        if extra > 0:
            tx = self.stream.tx
            tx.ask_skip(min(tx.queued, round(extra * self.stream.rate)))

    def queued_seconds(self) -> float:
        """How long until the audio written last has left the card."""
        return self.stream.tx.queued / self.stream.rate

    # --- health ---------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        stream = self.stream.stats()
        open_ = not self.stream.block.closed
        return {
            **stream,
            "dropped_samples": stream["dropped_samples"]
            + self.dropped
            + self.rx.dropped
            + self.rx.resampler.overflowed
            + self.tx.dropped,
            "device_up": float(self.up),
            "rx_underruns": float(self.rx.underruns),
            "tx_underruns": float(self.tx.underruns),
            "margin_widenings": float(self.rx.widenings + self.tx.widenings),
            "rx_ratio_ppm": self.rx.ppm,
            "tx_ratio_ppm": self.tx.ppm,
            "rx_buffer_seconds": self.rx.waiting / self.rate,
            "tx_buffer_seconds": self.stream.tx.queued / self.stream.rate if open_ else 0.0,
            "rx_level_seconds": self.rx.level,
            "tx_level_seconds": self.tx.level,
            "rx_margin_seconds": self.rx.margin,
            "tx_margin_seconds": self.tx.margin,
        }
