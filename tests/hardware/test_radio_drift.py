"""The card's crystal against the engine's clock, and late callbacks and ticks.

A real JACK dummy server runs on the host's clock, so it cannot drift. Most tests here
play the card side by calling the card process's stream callback exactly as PortAudio
would (on the same shared rings), in 256-frame periods, at a rate off the engine's (a
cheap card's crystal is within ±100 ppm); the engine side ticks every 20 ms. Time is
simulated, so minutes take seconds, and lateness is exactly what the test says. The
last runs the real path on a JACK server, with the engine's ticks 300 ppm slow instead.
"""

from __future__ import annotations

import os
from contextlib import closing

import numpy as np
import pytest
from gateway.hardware.card_process import Opened, OpenRequest, StreamCallback
from gateway.hardware.elastic import TRIM_S, WIDEN_S, WIDEN_STEP_S
from gateway.hardware.soundcard import LATE_TICK_S, CardSpec, SoundCard

from tests.hardware import failsafe_site
from tests.hardware.gwrun import build, drive, losses_seen
from tests.hardware.jackradio import (
    LEAST_WAIT_S,
    RATE,
    RadioSim,
    card_client,
    own_jackd,
    site_toml,
    tone,
    tone_gaps,
)
from tests.waiting import wait_for

DEV = 48000
PERIOD = 256
N = 320  # 20 ms at 16 kHz
FRAME_S = 0.02
RX_TARGET = PERIOD / DEV + 0.002  # a period plus the simulated card's 2 ms margin
TX_TARGET = PERIOD / DEV + LATE_TICK_S + 0.002  # transmit rides late ticks too
TONE = 0.25 * np.sin(2 * np.pi * 1000 * np.arange(48000) / DEV)  # a whole number of cycles


class InThisProcess:
    """The card's process, played here: the callback is called in simulated time below."""

    alive = True

    def stop(self) -> None:
        pass


class SimulatedCard:
    """A card with a 2 ms margin whose process is played here: the test calls its C
    callback at the (simulated) times it chooses, and ticks the card's side at others."""

    def __init__(self, ppm: float = 0.0, period: int = PERIOD, margin: float = 0.002) -> None:
        spec = CardSpec(device=0, sample_rate=DEV, margin=margin)
        self.card = card = SoundCard(spec, 16000, N, "sim")
        card.stream.process = InThisProcess()
        card.stream._started(Opened(DEV, "sim"))  # (as the card's process reports it open)
        self.callback = StreamCallback.for_card(
            card.stream.block, OpenRequest(0, None, 1, 1, 0, 0, DEV, period, "low", "")
        )
        self.now = 0.0
        card.stream.now = lambda: self.now
        self.period, self.cycle = period, period / (DEV * (1 + ppm * 1e-6))
        self.next_callback = 0.0
        self.played = 0  # samples of the tone the card recorded so far
        self.heard: list[np.ndarray] = []  # what the card played
        self.indata = np.zeros((period, 1), np.float32)
        self.outdata = np.zeros((period, 1), np.float32)

    def callbacks_until(self, t: float, late: float = 0.0) -> None:
        """Every callback due by ``t``, each called ``late`` seconds after its time."""
        while self.next_callback + late <= t:
            at = (self.played + np.arange(self.period)) % len(TONE)
            self.indata[:, 0] = TONE[at]
            self.callback(self.indata, self.outdata)
            self.card.stream.block.clock[0] = self.next_callback + late
            self.heard.append(self.outdata[:, 0].copy())
            self.played += self.period
            self.next_callback += self.cycle

    def tick(
        self, due: float, late: float = 0.0, card_late: float = 0.0, frame: np.ndarray | None = None
    ) -> np.ndarray | None:
        """One engine tick due at ``due``, run ``late`` seconds after it; the card's
        callbacks before it come ``card_late`` seconds after their time."""
        self.now = due + late
        self.callbacks_until(self.now, card_late)
        got = self.card.read()
        self.card.write(frame)
        self.card.end_of_tick(due)
        return got

    def stats(self) -> dict[str, float]:
        return self.card.stats()


def engine_tone(tick: int) -> np.ndarray:
    t = (tick * N + np.arange(N)) / 16000
    return (0.25 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)


@pytest.mark.parametrize("ppm", [300.0, -300.0])
def test_fifos_neither_underrun_nor_grow_when_the_card_drifts(ppm):
    """Three minutes of one long over, the card 300 ppm off the engine: after a minute to
    learn the drift, nothing runs dry or is dropped, the ratios are the drift, and the
    levels stay at their targets from minute 1 to minute 3."""
    sim = SimulatedCard(ppm)
    levels, ratios = [], []
    for tick in range(3 * 60 * 50):
        sim.tick(tick * FRAME_S, frame=engine_tone(tick))
        if tick == 50 * 60:
            settled = dict(sim.stats())
        if tick > 50 * 60:
            got = sim.stats()
            levels.append((got["rx_level_seconds"], got["tx_level_seconds"]))
            ratios.append((got["rx_ratio_ppm"], got["tx_ratio_ppm"]))
    stats = sim.stats()
    for key in ("rx_underruns", "tx_underruns", "dropped_samples", "margin_widenings"):
        assert stats[key] == settled[key], f"{key} after the first minute"
    # capture: more card samples per engine second → fewer out; playback: the card takes more
    rx_ppm, tx_ppm = np.mean(ratios, axis=0)
    assert abs(-rx_ppm - ppm) < 30, rx_ppm
    assert abs(tx_ppm - ppm) < 30, tx_ppm
    for level, target in zip(np.array(levels).T, (RX_TARGET, TX_TARGET), strict=True):
        first, last = np.mean(level[:1500]), np.mean(level[-1500:])
        assert abs(first - target) < 0.0005 and abs(last - target) < 0.0005, (first, last)


@pytest.mark.parametrize("offset", [0.0, 0.001, 0.002, 0.003, 0.004, 0.005])
def test_lateness_within_the_margin_runs_nothing_dry_at_any_phase(offset):
    """Ticks up to 1.5 ms late, callbacks up to 1.5 ms late (the margin is 2 ms), and the
    card's cycle at any offset from the ticks: the FIFOs never run dry, nothing widens,
    and what the card plays is the tone the engine sent, without a gap."""
    sim = SimulatedCard(ppm=40.0)
    sim.next_callback = offset
    rng = np.random.default_rng(int(offset * 1e4))
    for tick in range(60 * 50):
        late, card_late = rng.uniform(0, 0.0015, 2)
        sim.tick(tick * FRAME_S, late, card_late, frame=engine_tone(tick))
        if tick == 25:
            started = sim.stats()["dropped_samples"]  # (the start set the level)
    stats = sim.stats()
    assert stats["rx_underruns"] == 0 and stats["tx_underruns"] == 0, stats
    assert stats["margin_widenings"] == 0 and stats["dropped_samples"] == started, stats
    heard = np.concatenate(sim.heard)[5 * DEV :]
    blocks = np.abs(heard[: len(heard) // 48 * 48].reshape(-1, 48)).max(axis=1)
    assert blocks.min() > 0.2, "a gap in what the card played"


@pytest.mark.parametrize("lost", [False, True], ids=["card-late", "cycles-lost"])
def test_an_underrun_is_refilled_at_once_and_widens_the_margin_once(lost):
    """Once, the card's callbacks come 12 ms late (more than any margin), or the audio
    server loses 30 ms of cycles (no callbacks, no audio, then a schedule that much later):
    receive runs dry, once. It is counted, logged, the margin widens once (by the least
    step when the card was barely past the margin; by the bounded step when 30 ms of
    cycles were lost), and the FIFO is set back to its target at once (silence in, or the
    late audio the gap stood in for out); the level is back at its target after, with no
    creep and no second underrun either way."""
    sim = SimulatedCard()
    for tick in range(40 * 50):
        card_late = 0.012 if tick == 20 * 50 and not lost else 0.0
        if tick == 20 * 50 and lost:
            sim.next_callback += 0.030
        sim.tick(tick * FRAME_S, card_late=card_late, frame=engine_tone(tick))
    stats = sim.stats()
    assert stats["rx_underruns"] == 1 and stats["tx_underruns"] == 0, stats
    margin = 0.002 + (WIDEN_STEP_S if lost else WIDEN_S)
    assert sim.card.rx.margin == pytest.approx(margin) and stats["margin_widenings"] == 1
    assert stats["rx_level_seconds"] == pytest.approx(RX_TARGET - 0.002 + margin, abs=0.0005)
    assert stats["tx_level_seconds"] == pytest.approx(TX_TARGET, abs=0.0005)


def test_a_late_tick_runs_transmit_dry_once_and_it_is_refilled():
    """Twice, the media tick comes 20 ms late (past LATE_TICK_S and the margin): the card
    runs out of transmit audio once.
    The FIFO is refilled and the margin widens once, by that lateness (bounded
    by WIDEN_STEP_S), not by a token 1 ms that the next such tick would beat
    again: the second late tick is ridden."""
    sim = SimulatedCard()
    for tick in range(40 * 50):
        late = 0.020 if tick in (20 * 50, 30 * 50) else 0.0  # the second one is ridden
        sim.tick(tick * FRAME_S, late=late, frame=engine_tone(tick))
    stats = sim.stats()
    assert stats["tx_underruns"] == 1 and stats["rx_underruns"] == 0, stats
    margin = 0.002 + min(0.020, WIDEN_STEP_S)
    assert sim.card.tx.margin == pytest.approx(margin) and stats["margin_widenings"] == 1
    assert stats["tx_level_seconds"] == pytest.approx(TX_TARGET - 0.002 + margin, abs=0.0005)


def test_audio_piled_up_behind_an_engine_stall_is_cut_at_once():
    """The engine stalls 200 ms (ten ticks skipped, as the media clock does beyond its
    catch-up): 200 ms of received audio waits, which would be latency for the rest of the
    over. It is cut at once; nothing else is."""
    sim = SimulatedCard()
    delays = []
    tick = 0
    while tick < 30 * 50:
        sim.tick(tick * FRAME_S, frame=engine_tone(tick))
        delays.append(sim.stats()["rx_buffer_seconds"])
        tick += 11 if tick == 20 * 50 else 1
    stats = sim.stats()
    assert stats["dropped_samples"] > 0.15 * 16000
    assert max(delays[-200:]) < RX_TARGET + 0.002, max(delays[-200:])
    assert stats["rx_underruns"] == 0  # (transmit ran dry in the stall, and was refilled)


@pytest.mark.jack
def test_a_card_300_ppm_fast_on_a_real_audio_server_is_followed(jack_server, tmp_path):
    """A drifting card on the real path: PortAudio on a JACK server, the cards' processes,
    the gateway's own clock. JACK's dummy server keeps the host's clock, so the engine's
    ticks are slowed by 300 ppm instead: to the gateway that is a card crystal 300 ppm
    fast. One long over (a steady tone), 40 s. A FIFO that did not follow would grow
    by 0.3 ms a second: each one's level stays within what the design holds it to (its
    target, a period plus the margin, and less than the trim above it), and B still
    sends the tone A heard, at its level. Underruns and the control's ratios are not
    judged here: on a loaded machine the ticks come late and the audio server loses
    cycles now and then, and each refill moves the level the control then steers back
    (``bench/radio_latency.py --card-ppm 300`` measures them)."""
    server = f"blppm{os.getpid()}"
    with own_jackd(server, 256, back_to=jack_server):
        radio = """
kind = "soundcard"
device = "system"
host_api = "JACK"
squelch = { type = "vox", threshold_dbfs = -45, hang = "200ms" }
"""
        gw = build(tmp_path, site_toml({"radio_a": radio, "radio_b": radio}))
        gw.clock.period *= 1 + 300e-6
        with closing(RadioSim(server, 2, seconds=70.0)) as sim:
            sim.connect(0, card_client("radio_a"))
            sim.connect(1, card_client("radio_b"))
            a, b = (gw.ports[name].card for name in ("radio_a", "radio_b"))

            def scenario() -> tuple[list[tuple[float, float]], int, int]:
                wait_for(lambda: gw.engine.tick_count > 25, LEAST_WAIT_S, "the gateway to tick")
                sim.start(0, tone(1000, 1.0, -12), loop=True)
                excess, start = [], gw.engine.tick_count
                seen = failsafe_site.losses(gw)
                for tick in range(start + 50, start + 40 * 50, 10):
                    wait_for(lambda t=tick: gw.engine.tick_count >= t, LEAST_WAIT_S, "ticks")
                    # A counted loss (a stalled gateway's skipped ticks, an underrun)
                    # refills a FIFO once the card is on time again: until then its level
                    # is whatever the stall left. It is judged again from the next sample.
                    rx, tx = over_target(a.stats(), "rx"), over_target(b.stats(), "tx", LATE_TICK_S)
                    levels = (rx, tx)
                    now = failsafe_site.losses(gw)
                    if now == seen:
                        excess.append(levels)
                    seen = now
                before = failsafe_site.losses(gw, sim)
                since = sim.frame + RATE // 5  # (what B plays lags the count by the path)
                wait_for(lambda: sim.frame > since + 3 * RATE, LEAST_WAIT_S, "three seconds more")
                return excess, since, losses_seen(gw, sim) - before

            excess, since, lost = drive(gw, scenario, timeout=90)
            heard = sim.recorded(1, since=since)[: 3 * RATE]  # (not after the stop)
    assert len(excess) > 100, f"only {len(excess)} of 195 levels judged: losses all along"
    assert max(max(pair) for pair in excess) <= TRIM_S + 0.001, max(excess)
    tone_gaps(heard, 1000, -12, lost)


def over_target(stats: dict[str, float], way: str, late_tick: float = 0.0) -> float:
    """How far a FIFO's level is above its target (a card period, ``late_tick`` and its
    margin)."""
    target = 256 / 48000 + late_tick + stats[f"{way}_margin_seconds"]
    return stats[f"{way}_level_seconds"] - target


def test_a_start_drops_no_more_than_a_tick_of_audio():
    """A new stream's first callbacks (a quarter of a second) only place the card's
    cycle: their audio is not kept, so the receive FIFO's first fill cuts at most what one
    tick captured, not all of it (which the dropped-samples count would show at every
    start)."""
    sim = SimulatedCard()
    for tick in range(50):
        sim.tick(tick * FRAME_S, frame=engine_tone(tick))
    stats = sim.stats()
    assert stats["rx_level_seconds"] == pytest.approx(RX_TARGET, abs=0.0005)
    assert 0 <= stats["dropped_samples"] <= N, stats["dropped_samples"]
