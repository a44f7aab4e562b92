"""Cross-border link figures: mouth-to-ear over a link, cut → silence, dead link, CPU.

    .venv/bin/python bench/links.py            # every table (about four minutes)
    .venv/bin/python bench/links.py --quick    # fewer bursts and repeats (about a minute)
    .venv/bin/python bench/links.py --realtime # the gateways at SCHED_FIFO 3, as in production
    .venv/bin/python bench/links.py --codecs 3 # Opus against G.711: 3 interleaved rounds
    .venv/bin/python bench/links.py --delay    # mouth-to-ear only, each step of it timed
    .venv/bin/python bench/links.py --frame 10ms [--delay [--g711]]  # both engines at 10 ms
    .venv/bin/python bench/links.py --cpu 3 --realtime --frame 10ms  # the CPU case alone, 3 rounds

Two real gateways (engine, clock, SIP over TLS, SRTP, the links service) on this loop,
linked as in tests/links, with bench radios that play tone bursts and record what they
hear with the time of each frame. Their link's media goes through the impairment relay
(tests/links/relay.py): the CA side's leg is pointed at the relay and the US side's leg
latches onto it, as to a peer behind NAT. Times are read where the engine hands a frame
over: a frame read at *t* was spoken over the 20 ms before *t*, a frame written at *t*
is played from *t* — what a sound card with no buffering of its own would do.

1. *mouth-to-ear*: radio(CA) → radio(US) onset of each burst, at 0 ms and 40 ± 10 ms
   one way with 2 % loss; "added" is the measured delay minus the network's mean one-way
   delay (p50, p99). Bursts are 200 ms every 1.2 s: longer than the receiving leg's VOX
   hang, so every burst is a new over and its VOX attack is in the figure. Two gateways'
   ticks have no common phase, and the wait for the receiving side's next tick (0-20 ms)
   is part of every delay: so that one run's figure is not one phase's luck, US's clock
   is moved on by 0.618 of a frame in the silence after each burst (the bursts sample
   the phases evenly; a run once gave 34 ms, the next 39 ms, before). The tone's
   signal-to-noise ratio during a steady tone with the loss says whether concealment
   is audible (a click or a gap spreads energy out of the tone's band);
2. *cut → silence*: CA cuts the link (``LinksService.cut``, what the CLI and MQTT call)
   while its radio talks; the time until the US radio hears nothing any more;
3. *dead link*: both relays black out (signalling and media); the time until each side
   dropped the dialog (keepalive: ≤ 2 s by design) and the US radio was unkeyed;
4. *CPU*: two ``borderlink run`` processes sharing 100 talkgroups over one link, 10 of
   them talking on the CA side: each process's CPU over 20 s, in % of one core.

``--delay`` runs only 1, and times each burst's first packet where the code hands it
over (:class:`Trace`): the table that follows splits the added delay into the sender's
frame, its tick, the network, the jitter rule, the wait for the receiver's tick, that
tick's lateness and work, and the codec's delay (docs/links.md, "Delay budget").

``--codecs N`` compares the link's two codecs instead (both sides' ``codecs`` set to
``["opus", "pcmu"]`` or ``["pcmu"]``): N rounds, each running 1 (40 ± 10 ms, 2 % loss
only) and 4 for G.711 then Opus, so the machine's load falls on both alike; the table
gives the median over the rounds of each figure.

Figures on a shared 2-core machine are noisy: the load average is printed with them.
Under load, late ticks look like network jitter to the receiving jitter buffer, which
grows to cover them; ``--realtime [PRIO]`` runs the two gateways (this process) at
SCHED_FIFO, as a production gateway runs (systemd ``CPUSchedulingPolicy=fifo``), which
takes most of that out; the CPU processes too (at normal priority on a loaded machine
they are starved, skip ticks and do less work: the table says how many they skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "links"))

from gateway.codecs.tones import ToneGenerator  # noqa: E402
from pydantic import Field  # noqa: E402
from relay import Impairment, TcpRelay, UdpRelay  # noqa: E402
from trunk_sites import (  # noqa: E402
    RATE,
    LinkSpec,
    SiteSpec,
    both_up,
    link_leg,
    make_pki,
    media_through,
    running,
    site_toml,
    with_frame,
)

from gateway.config import PortConfig  # noqa: E402
from gateway.endpoints import ENDPOINTS, Endpoint  # noqa: E402
from gateway.ports import Frame, Port  # noqa: E402
from gateway.sip.jitter import MARGIN  # noqa: E402
from gateway.site import run_async  # noqa: E402
from tests.waiting import until  # noqa: E402

FRAME = 0.02
JITTER_RATE = 8000  # the jitter bank's units (codec samples)
# Not a multiple of 50 Hz: a frame repeated to conceal a loss does not continue the tone's
# phase (a 1 kHz tone is exactly 20 cycles a frame, and would hide every concealment).
TONE = 1033.0
BURST = 0.2  # seconds of tone
GAP = 1.0  # seconds of silence: longer than the receiving leg's VOX hang (0.8 s)
PHASE_STEP = (5**0.5 - 1) / 2  # frames US's ticks move on after each burst (golden ratio)
LEVEL_DBFS = -20.0
ONSET = 0.25 * 10 ** (LEVEL_DBFS / 20) * 2**0.5  # a quarter of the tone's peak
SILENCE = 10 ** (-50 / 20)  # a frame whose peak is below -50 dBFS is silent


class BenchRadioConfig(PortConfig):
    tone_hz: float = Field(1000.0, gt=0, le=4000)


class BenchRadio(Port):
    """Speaks steadily, in bursts, or not at all; keeps (time, frame) of what it hears."""

    def __init__(self, name: str, config: BenchRadioConfig, timing) -> None:  # noqa: ANN001
        super().__init__(name, config, timing)
        self.tone = ToneGenerator([config.tone_hz], timing.rate, LEVEL_DBFS)
        self.mode = "quiet"  # "steady" | "bursts"
        self.onsets: list[float] = []  # when each burst began (mouth)
        self.heard: collections.deque[tuple[float, np.ndarray]] = collections.deque(maxlen=5000)
        self.in_gap: Callable[[], None] | None = None  # called once in each burst's silence
        self._tick = 0

    def read(self) -> Frame | None:
        now = time.monotonic()
        speak = self.mode == "steady"
        if self.mode == "bursts":
            frame = self.frame_samples / RATE
            burst, gap = round(BURST / frame), round(GAP / frame)
            phase = self._tick % (burst + gap)
            self._tick += 1
            if phase == 0:
                self.onsets.append(now - frame)  # the frame was spoken over the last frame
            if phase == burst + gap // 2 and self.in_gap is not None:
                self.in_gap()
            speak = phase < burst
        self.talking = speak
        return self.tone.read(self.frame_samples) if speak else None

    def write(self, frame: Frame | None) -> None:
        silent = np.zeros(self.frame_samples, np.float32)
        self.heard.append((time.monotonic(), silent if frame is None else frame.copy()))

    def burst(self) -> None:
        self.mode, self._tick = "bursts", 0

    def heard_since(self, since: float) -> list[tuple[float, np.ndarray]]:
        return [(t, f) for t, f in self.heard if t >= since]


BENCH_ENDPOINTS = (
    *ENDPOINTS,
    Endpoint("bench radio", ports={"bench_link_radio": (BenchRadioConfig, BenchRadio)}),
)


# --- finding things in what a radio heard --------------------------------------------


def onset_after(heard: list[tuple[float, np.ndarray]], start: float, within: float) -> float | None:
    """When the first sample above ONSET was played, in (start, start + within)."""
    for t, frame in heard:
        if t < start - FRAME or t > start + within:
            continue
        loud = np.flatnonzero(np.abs(frame) > ONSET)
        if len(loud) and t + loud[0] / RATE > start:
            return t + loud[0] / RATE
    return None


def last_sound(heard: list[tuple[float, np.ndarray]]) -> float | None:
    """When the last sample above SILENCE was played."""
    for t, frame in reversed(heard):
        loud = np.flatnonzero(np.abs(frame) > SILENCE)
        if len(loud):
            return t + (loud[-1] + 1) / RATE
    return None


def tone_snr_db(heard: list[tuple[float, np.ndarray]], hz: float) -> float:
    """Energy in ±50 Hz of the tone against everything else (clicks, gaps, noise)."""
    x = np.concatenate([f for _, f in heard])
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    band = (freqs > hz - 50) & (freqs < hz + 50)
    return float(10 * np.log10(power[band].sum() / max(power[~band].sum(), 1e-20)))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- two gateways, their link's media through the relay ------------------------------


class Pair:
    """CA and US, each reaching the other's TLS port through a TCP relay (signalling) and
    CA's link media through a UDP relay (both ways)."""

    def __init__(self, folder: Path, frame: str = "") -> None:
        self.folder = folder
        self.frame = frame  # both engines' frame ("10ms"; "": the default)
        self.pki = make_pki(folder, ("ca", "us"))
        self.ca = SiteSpec("ca", {"marine": TONE}, [LinkSpec("us", "us", {"marine": "ship"})])
        self.us = SiteSpec("us", {"harbor": 1500.0}, [LinkSpec("ca", "ca", {"harbor": "ship"})])

    def toml(self, spec: SiteSpec, ports: dict[str, int], codecs: str = "") -> Path:
        path = site_toml(self.folder, spec, ports, self.pki)
        text = with_frame(with_codecs(path.read_text(), codecs), self.frame)
        path.write_text(text.replace('"test_link_radio"', '"bench_link_radio"'))
        return path


def with_codecs(text: str, codecs: str) -> str:
    """A site file whose links offer ``codecs`` (a TOML list; "": the default)."""
    if not codecs:
        return text
    lines = [
        f"{line}\ncodecs = {codecs}" if line.startswith("peer_name = ") else line
        for line in text.split("\n")
    ]
    return "\n".join(lines)


async def linked(ca, us, media: UdpRelay) -> None:  # noqa: ANN001
    """Wait for the link; put its media through ``media`` (again after every redial).

    Both legs are taken in one look: just after a redial a side may briefly hold two
    (the glare loser not yet gone) or none, and a leg replaced meanwhile is tried again."""
    for attempt in range(3):
        await both_up(ca, us, "ship", 60)

        def legs():  # noqa: ANN202
            ours, theirs = link_leg(ca), link_leg(us)
            return (ours, theirs) if ours is not None and theirs is not None else None

        try:
            await media_through(*await until(legs, 30, "one leg on each side"), media)
            return
        except (AttributeError, AssertionError, TimeoutError):
            if attempt == 2:
                raise


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


LOSSY = Impairment(delay=0.040, jitter=0.010, loss=0.02)


@dataclass
class MouthToEar:
    added: list[float]  # each burst's delay beyond the network's mean one-way delay
    buffered: float  # the US leg's jitter-buffer delay, p50
    snr: float  # the steady tone's SNR at US, dB
    lost: int  # packets the relay dropped during the steady tone
    late: int = 0  # ... and the US leg's jitter buffer found late
    concealed: float = 0.0  # seconds the US leg concealed meanwhile
    steps: list[dict[str, float]] = field(default_factory=list)  # --trace: each burst's STEPS


def shift_ticks(clock, seconds: float) -> None:  # noqa: ANN001
    """Move every later tick of ``clock`` by ``seconds``: the bench samples every phase
    between the two sides' ticks (the gateway itself never moves its clock)."""
    if clock.start is not None:
        clock.start += seconds


# --- where the milliseconds go (--trace) ----------------------------------------------

STEPS = (
    ("frame", "sender's frame: the onset is read a frame after it was spoken"),
    ("mix", "CA's tick: read → the tick's work done (mix, metering, events)"),
    ("send", "CA's tick done → its packet sent (encode, header extension, SRTP, sendmmsg)"),
    ("network", "sent → kernel arrival at US (relay; minus the WAN's mean delay)"),
    ("rule", "arrival → playable by the jitter rule (p95 transit + 2 ms, over this packet's)"),
    ("phase", "playable → US's next tick (its deadline: the clocks have no common phase)"),
    ("late", "US's tick deadline → the jitter bank plays (timer lateness, drain)"),
    ("decode", "played → frame written to the radio (decode, VOX, mix)"),
    ("codec", "start of that frame → the onset sample in it (Opus look-ahead; G.711: resamplers)"),
)


class Trace:
    """Timestamps of each packet through the path, read where the code hands it over:
    CA's sends (with their RTP time), US's kernel arrivals and transits into the jitter
    bank, and US's playouts (tick deadline, when it ran, the slot played, the rule's
    slowest transit). Installed on the two live gateways by wrapping those calls."""

    def __init__(self, ca, us) -> None:  # noqa: ANN001
        self.offset = time.time() - time.monotonic()  # wall → monotonic
        self.sends: list[tuple[float, int]] = []  # (monotonic, RTP time of CA's link row)
        self.ends: list[float] = []  # CA's ticks' work done (its after-tick hooks begin)
        self.arrivals: dict[int, tuple[float, float]] = {}  # slot → (monotonic, transit s)
        self.plays: list[tuple[float, float, int, float]] = []  # (deadline, ran, slot, slowest)
        self.ca_leg, self.us_leg = link_leg(ca), link_leg(us)
        self.frame = ca.clock.period
        self.opus = bool(self.us_leg.bank.table.opus[self.us_leg.row])
        self._wrap_send(self.ca_leg.bank)
        ca.engine.after_tick.insert(0, lambda: self.ends.append(time.monotonic()))
        self._wrap_receive(self.us_leg.bank)

    def _wrap_send(self, bank) -> None:  # noqa: ANN001
        sender, row, send = bank.sender, self.ca_leg.row, bank.sender.send

        def traced(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            ts = int(bank.table.tx_ts[row])
            done = send(*args, **kwargs)
            self.sends.append((time.monotonic(), ts))
            return done

        sender.send = traced

    def _wrap_receive(self, bank) -> None:  # noqa: ANN001
        jitter, row, rate = bank.jitter, self.us_leg.row, bank.jitter.rate
        epoch = bank.receive_path.epoch_seconds
        put, playout = jitter.put_batch, jitter.playout

        def traced_put(rows, timestamps, codes, arrival, marker):  # noqa: ANN001, ANN202
            kept = put(rows, timestamps, codes, arrival, marker)
            for i in np.flatnonzero(rows == row).tolist():
                at = epoch + float(arrival[i]) / rate - self.offset
                slot = int(timestamps[i])
                transit = jitter.transit[row, (jitter.count[row] - 1) % jitter.transit.shape[1]]
                self.arrivals[slot] = (at, float(transit) / rate)
            return kept

        def traced_playout(rows, now, *args):  # noqa: ANN001, ANN002, ANN202
            ran = time.monotonic()
            pcm = playout(rows, now, *args)
            if jitter.started[row]:
                slowest = np.sort(jitter.transit[row])[-4] / rate
                slot = int(jitter.play[row] - jitter.frame) & 0xFFFFFFFF
                self.plays.append((epoch + now / rate - self.offset, ran, slot, slowest))
            return pcm

        jitter.put_batch, jitter.playout = traced_put, traced_playout

    def steps(self, onset: float, found: float, heard: list, wan: float) -> dict[str, float] | None:
        """One burst's delay (``found - onset``) in the STEPS, or None if not traced."""
        written = max((t for t, _ in heard if t <= found), default=None)
        play = max((p for p in self.plays if p[1] <= (written or 0)), default=None)
        if written is None or play is None:
            return None
        deadline, ran, slot, slowest = play
        if slot not in self.arrivals:
            return None
        arrived, transit = self.arrivals[slot]
        scale = 6 if self.opus else 1  # US keeps Opus's RTP time in 8 kHz units
        near = lambda ts: abs((ts - slot * scale + 2**31) % 2**32 - 2**31) < scale  # noqa: E731
        sent = [t for t, ts in self.sends if near(ts)]
        if not sent:
            return None
        read = onset + self.frame
        done = max((t for t in self.ends if t <= sent[0]), default=read)
        playable = arrived + slowest + MARGIN / JITTER_RATE - transit
        return {
            "frame": read - onset,
            "mix": done - read,
            "send": sent[0] - done,
            "network": arrived - sent[0] - wan,
            "rule": playable - arrived,
            "phase": deadline - playable,
            "late": ran - deadline,
            "decode": written - ran,
            "codec": found - written,
        }


async def mouth_to_ear(  # noqa: ANN001
    ca, us, media: UdpRelay, wan: Impairment, bursts: int, trace: bool = False
) -> MouthToEar:
    """Radio(CA) → radio(US) over the link with the relay at ``wan``: a steady tone's SNR,
    then the onset delay of ``bursts`` bursts (``trace``: each split into :data:`STEPS`)."""
    mouth, ear = ca.ports["marine-radio"], us.ports["harbor-radio"]
    media.impair = wan
    media.back = Impairment(delay=wan.delay, jitter=wan.jitter)
    mouth.mode = "steady"
    await asyncio.sleep(3.0)  # the jitter buffer settles on the new WAN
    since, lost = time.monotonic(), media.up.lost
    before = link_leg(us).stats()
    await asyncio.sleep(8.0)
    lost = media.up.lost - lost
    after = link_leg(us).stats()
    late = after["packets_late"] - before["packets_late"]
    concealed = (after["concealed_samples"] - before["concealed_samples"]) / RATE
    snr = tone_snr_db(ear.heard_since(since), TONE)
    mouth.mode = "quiet"
    await asyncio.sleep(1.0)
    mouth.onsets.clear()
    mouth.in_gap = lambda: shift_ticks(us.clock, PHASE_STEP * us.clock.period)
    tracer = Trace(ca, us) if trace else None
    mouth.burst()
    buffered: list[float] = []  # the US leg's jitter-buffer delay

    def sample() -> bool:
        leg = link_leg(us)
        if leg is not None:
            buffered.append(leg.stats().get("jitter_buffer_seconds", 0.0))
        return len(mouth.onsets) > bursts

    await until(sample, bursts * 1.5 + 30, "bursts")
    mouth.mode, mouth.in_gap = "quiet", None
    await asyncio.sleep(0.6)
    heard = list(ear.heard)
    found = [(onset, onset_after(heard, onset, 0.5)) for onset in mouth.onsets[:bursts]]
    found = [(onset, at) for onset, at in found if at is not None]
    steps = [tracer.steps(onset, at, heard, wan.delay) for onset, at in found] if tracer else []
    return MouthToEar(
        [at - onset - wan.delay for onset, at in found],
        percentile(buffered, 50),
        snr,
        lost,
        late,
        concealed,
        [s for s in steps if s is not None],
    )


def budget_rows(label: str, m: MouthToEar) -> list[str]:
    """The traced bursts' delay step by step: mean and p50 of each (the means add up)."""
    if not m.steps:
        return [f"| {label}: no burst traced | | | |"]
    rows = []
    for name, what in STEPS:
        values = [1000 * s[name] for s in m.steps]
        rows.append(
            f"| {label}: {name} | {np.mean(values):.1f} | {np.median(values):.1f} | {what} |"
        )
    total = [1000 * sum(s.values()) for s in m.steps]
    rows.append(
        f"| {label}: added, in all | {np.mean(total):.1f} | {np.median(total):.1f} | "
        f"{len(m.steps)} bursts traced |"
    )
    return rows


async def latency_and_cut(
    folder: Path,
    bursts: int,
    cuts: int,
    deaths: int,
    trace: bool = False,
    frame: str = "",
    budget: list[str] | None = None,
    codecs: str = "",
) -> list[str]:
    """The mouth-to-ear rows, then (``cuts``, ``deaths``) cut → silence and dead link;
    ``trace``: each condition's step-by-step budget into ``budget``; ``codecs``: what
    both sides' links offer (a TOML list; "": the default)."""
    pair = Pair(folder, frame)
    rows = []
    async with (
        TcpRelay(("127.0.0.1", pair.us.tls_port), lifetime=3600) as to_us,
        TcpRelay(("127.0.0.1", pair.ca.tls_port), lifetime=3600) as to_ca,
        UdpRelay(("127.0.0.1", 9), lifetime=3600) as media,
    ):
        ca_path = pair.toml(pair.ca, {"us": to_us.port}, codecs)
        us_path = pair.toml(pair.us, {"ca": to_ca.port}, codecs)
        async with running(ca_path, BENCH_ENDPOINTS) as ca, running(us_path, BENCH_ENDPOINTS) as us:
            mouth, ear = ca.ports["marine-radio"], us.ports["harbor-radio"]
            await linked(ca, us, media)

            # 1. mouth-to-ear, per network condition
            for label, wan in (("0 ms", Impairment()), ("40±10 ms, 2% loss", LOSSY)):
                m = await mouth_to_ear(ca, us, media, wan, bursts, trace)
                if budget is not None:
                    budget += budget_rows(label, m)
                rows.append(
                    f"| mouth-to-ear, {label} | {len(m.added)}/{bursts} | "
                    f"{1000 * percentile(m.added, 50):.1f} | "
                    f"{1000 * percentile(m.added, 99):.1f} | "
                    f"jitter buffer {1000 * m.buffered:.0f} ms (p50, the tick's phase in it); "
                    f"tone SNR {m.snr:.0f} dB (8 s of steady tone, {m.lost} packets lost, "
                    f"{m.late} late, {1000 * m.concealed:.0f} ms concealed) |"
                )

            if not cuts and not deaths:
                return rows
            # 2. cut → silence on the far side, at 40±10 ms
            silences = []
            for _ in range(cuts):
                mouth.mode = "steady"
                await until(
                    lambda: ear.heard and np.abs(ear.heard[-1][1]).max() > ONSET,
                    10,
                    "the tone at US",
                )
                await asyncio.sleep(1.0)
                cut_at = time.monotonic()
                ca.links.cut("us", None, "bench", "bench", "bench")
                await asyncio.sleep(1.0)
                end = last_sound(ear.heard_since(cut_at - 0.5))
                silences.append((end or cut_at) - cut_at)
                mouth.mode = "quiet"
                ca.links.restore("us", None, "bench", "bench")
                await linked(ca, us, media)
            rows.append(
                f"| `link cut` → silence at US, 40±10 ms | {len(silences)} | "
                f"{1000 * percentile(silences, 50):.1f} | {1000 * percentile(silences, 99):.1f} "
                f"| goal ≤ 20 ms + RTT/2 = 60 ms |"
            )

            # 3. a dead link: every relay goes dark
            noticed, unkeyed = [], []
            ear_index = us.engine.ports.index(ear)
            for _ in range(deaths):
                mouth.mode = "steady"
                await until(lambda: us.engine.keying.keyed[ear_index], 10, "US keyed")
                dark = time.monotonic()
                for relay in (to_us, to_ca, media):
                    relay.blackout()
                await until(lambda: not us.engine.keying.keyed[ear_index], 20, "US unkeyed")
                unkeyed.append(time.monotonic() - dark)
                await until(
                    lambda: link_leg(ca) is None and link_leg(us) is None, 20, "both legs gone"
                )
                noticed.append(time.monotonic() - dark)
                mouth.mode = "quiet"
                for relay in (to_us, to_ca, media):
                    relay.resume()
                await linked(ca, us, media)
            rows.append(
                f"| dead link → US radio unkeyed | {len(unkeyed)} | "
                f"{1000 * percentile(unkeyed, 50):.0f} | {1000 * max(unkeyed):.0f} (max) | |"
            )
            rows.append(
                f"| dead link → dialog dropped (keepalive) | {len(noticed)} | "
                f"{1000 * percentile(noticed, 50):.0f} | {1000 * max(noticed):.0f} (max) "
                f"| goal ≤ 2000 ms |"
            )
    return rows


# --- CPU: 100 shared talkgroups over one link ------------------------------------------


def cpu_site(
    folder: Path,
    spec: SiteSpec,
    ports: dict[str, int],
    pki,
    talking: int,  # noqa: ANN001
    codecs: str = "",
) -> Path:
    """A site file with simulated radios (built in: ``borderlink run`` needs no test code)."""
    path = site_toml(folder, spec, ports, pki)
    text = with_codecs(path.read_text(), codecs)
    for i, tg in enumerate(spec.tones):
        always = i < talking
        radio = f'kind = "simulated_radio"\ntone_hz = {spec.tones[tg]}\n' + (
            'talk_every = "0s"\ntalk_for = "0s"\n'
            if always
            else 'talk_every = "24h"\ntalk_for = "1s"\ntalk_offset = "23h"\n'
        )
        text = text.replace(
            f'[ports.{tg}-radio]\nkind = "test_link_radio"\ntone_hz = {spec.tones[tg]}\n',
            f"[ports.{tg}-radio]\n{radio}",
        )
    path.write_text(text)
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def link_status(path: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "link", "status", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {}


def cpu(
    folder: Path, talkgroups: int, talking: int, seconds: float, realtime: int, frame: str = ""
) -> list[str]:
    used, up = cpu_use(folder, talkgroups, talking, seconds, realtime=realtime, frame=frame)
    return [
        f"| CPU, {talkgroups} shared talkgroups ({up} up), {talking} talking: CA (sends) | "
        f"{seconds:.0f} s | {100 * used['ca']:.1f} % | | goal ≤ 25 % of a core; "
        f"{used['ca_skipped']:.0f} ticks skipped |",
        f"| CPU, same: US (receives, 100 radios listening) | {seconds:.0f} s | "
        f"{100 * used['us']:.1f} % | | {used['us_skipped']:.0f} ticks skipped |",
    ]


def cpu_rounds(rounds: int, realtime: int, frame: str) -> None:
    """The CPU case alone, ``rounds`` times: each round's figures, then the medians."""
    print(f"# CPU, 100 shared talkgroups, 10 talking, frame {frame or '20ms'}, {load()}")
    print("| round | CA (sends) | US (receives) | ticks skipped CA / US | load |")
    print("|---|---|---|---|---|")
    ca, us = [], []
    for n in range(1, rounds + 1):
        with tempfile.TemporaryDirectory(prefix="bench-links-cpu-") as folder:
            used, _ = cpu_use(Path(folder), 100, 10, 10.0, realtime=realtime, frame=frame)
        ca.append(100 * used["ca"])
        us.append(100 * used["us"])
        print(
            f"| {n} | {ca[-1]:.1f} % | {us[-1]:.1f} % | {used['ca_skipped']:.0f} / "
            f"{used['us_skipped']:.0f} | {os.getloadavg()[0]:.2f} |",
            flush=True,
        )
    print(f"| median | {statistics.median(ca):.1f} % | {statistics.median(us):.1f} % | | |")


def cpu_use(
    folder: Path,
    talkgroups: int,
    talking: int,
    seconds: float,
    codecs: str = "",
    realtime: int = 0,
    frame: str = "",
) -> tuple[dict[str, float], int]:
    """Each process's CPU (share of a core), the ticks each skipped in all (a process
    starved of CPU skips ticks, and so does less work: its figure is then too low), and
    how many shared names were up. ``realtime``: the processes at SCHED_FIFO; ``frame``:
    their engines' frame ("10ms"; "": the default)."""
    folder.mkdir(parents=True, exist_ok=True)
    pki = make_pki(folder, ("ca", "us"))
    names = [f"tg{i:03d}" for i in range(talkgroups)]
    ca = SiteSpec(
        "ca",
        {n: 300.0 + 25 * (i % 100) for i, n in enumerate(names)},
        [LinkSpec("us", "us", {n: n for n in names})],
    )
    us = SiteSpec("us", {n: 3000.0 for n in names}, [LinkSpec("ca", "ca", {n: n for n in names})])
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    paths = {
        "ca": cpu_site(folder, ca, ports, pki, talking, codecs),
        "us": cpu_site(folder, us, ports, pki, 0, codecs),
    }
    for path in paths.values():
        path.write_text(with_frame(path.read_text(), frame))
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", str(path)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(folder / f"{name}.log", "wb"),  # noqa: SIM115
            start_new_session=True,
            preexec_fn=(
                (lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(realtime)))
                if realtime
                else None
            ),
        )
        for name, path in paths.items()
    }
    try:
        deadline = time.monotonic() + 180
        up = 0
        while time.monotonic() < deadline:
            status = link_status(paths["ca"]).get("links", {}).get("us", {}).get("shares", {})
            up = sum(state == "up" for state in status.values())
            if up == talkgroups:
                break
            time.sleep(2)
        time.sleep(3)
        before = {n: cpu_seconds(p.pid) for n, p in procs.items()}
        started = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - started
        used = {n: (cpu_seconds(p.pid) - before[n]) / wall for n, p in procs.items()}
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    for name in procs:
        said = re.findall(r"(\d+) skipped so far", (folder / f"{name}.log").read_text())
        used[f"{name}_skipped"] = float(said[-1]) if said else 0.0
    return used, up


# --- Opus against G.711, interleaved --------------------------------------------------

CODECS = {"G.711 µ-law": '["pcmu"]', "Opus": '["opus", "pcmu"]'}


async def codec_round(folder: Path, codecs: str, bursts: int) -> MouthToEar:
    """Mouth-to-ear at 40 ± 10 ms, 2 % loss, with both sides' links offering ``codecs``."""
    pair = Pair(folder)
    async with UdpRelay(("127.0.0.1", 9), lifetime=3600) as media:
        ports = {"ca": pair.ca.tls_port, "us": pair.us.tls_port}
        ca_path, us_path = pair.toml(pair.ca, ports, codecs), pair.toml(pair.us, ports, codecs)
        async with running(ca_path, BENCH_ENDPOINTS) as ca, running(us_path, BENCH_ENDPOINTS) as us:
            await linked(ca, us, media)
            return await mouth_to_ear(ca, us, media, LOSSY, bursts)


def compare(folder: Path, rounds: int, bursts: int, seconds: float, realtime: int) -> list[str]:
    """Each figure per codec, the median of ``rounds`` rounds run G.711, Opus, G.711, ...
    (the linked pair and the CPU processes at SCHED_FIFO ``realtime`` if not 0)."""
    got: dict[str, list] = {name: [] for name in CODECS}
    for r in range(rounds):
        for name, codecs in CODECS.items():
            where = folder / f"{r}-{len(got[name])}-{codecs.count(',')}"
            if realtime:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(realtime))
            got_one: list[MouthToEar] = []

            async def one(
                folder: Path = where / "pair", codecs: str = codecs, into: list = got_one
            ) -> None:
                into.append(await codec_round(folder, codecs, bursts))

            run_async(one())
            m = got_one[0]
            if realtime:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            used, up = cpu_use(where / "cpu", 100, 10, seconds, codecs, realtime)
            got[name].append((m, used, up))
            print(
                f"round {r + 1} {name}: added p50 {1000 * percentile(m.added, 50):.1f} ms, "
                f"CPU CA {100 * used['ca']:.1f} % US {100 * used['us']:.1f} % ({up} up), "
                f"{load()}",
                flush=True,
            )
    rows = []
    for name, runs in got.items():
        med = lambda values: float(np.median(values))  # noqa: E731
        rows += [
            f"| {name}: mouth-to-ear added, 40±10 ms, 2% loss | {rounds}×{bursts} | "
            f"{1000 * med([percentile(m.added, 50) for m, _, _ in runs]):.1f} | "
            f"{1000 * med([percentile(m.added, 99) for m, _, _ in runs]):.1f} | "
            f"jitter buffer {1000 * med([m.buffered for m, _, _ in runs]):.0f} ms; tone SNR "
            f"{med([m.snr for m, _, _ in runs]):.0f} dB ({sum(m.lost for m, _, _ in runs)} "
            f"packets lost in all) |",
            f"| {name}: CPU, 100 shared talkgroups, 10 talking: CA / US | {rounds}×"
            f"{seconds:.0f} s | {100 * med([u['ca'] for _, u, _ in runs]):.1f} % / "
            f"{100 * med([u['us'] for _, u, _ in runs]):.1f} % | | "
            f"{min(up for _, _, up in runs)} of 100 up; goal ≤ 25 % |",
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer bursts and repeats")
    parser.add_argument(
        "--realtime",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="PRIO",
        help="run the linked pair at SCHED_FIFO PRIO (default 3)",
    )
    parser.add_argument(
        "--codecs",
        type=int,
        default=0,
        metavar="N",
        help="compare Opus with G.711 over N interleaved rounds",
    )
    parser.add_argument(
        "--delay",
        action="store_true",
        help="mouth-to-ear only, each burst traced step by step (where the milliseconds go)",
    )
    parser.add_argument("--frame", default="", help='both engines\' frame ("10ms" or "20ms")')
    parser.add_argument("--g711", action="store_true", help="with --delay: the link on G.711")
    parser.add_argument(
        "--cpu", type=int, default=0, metavar="N", help="the CPU case alone, N rounds of 10 s"
    )
    args = parser.parse_args()
    bursts, cuts, deaths, seconds = (10, 3, 2, 10.0) if args.quick else (40, 8, 4, 20.0)
    if args.cpu:
        cpu_rounds(args.cpu, args.realtime, args.frame)
        return
    if args.delay:
        delay_only(bursts, args.frame, args.realtime, CODECS["G.711 µ-law"] if args.g711 else "")
        return
    rows: list[str] = []
    if args.codecs:
        with tempfile.TemporaryDirectory(prefix="bench-links-") as folder:
            print(f"# Opus against G.711 on a link, {args.codecs} rounds, {load()}", flush=True)
            rows = compare(Path(folder), args.codecs, bursts, seconds, args.realtime)
        print("| figure | n | p50 (ms) / value | p99 (ms) | note |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(row)
        print(f"({load()} after)")
        return
    with tempfile.TemporaryDirectory(prefix="bench-links-") as folder:
        priority = f"SCHED_FIFO {args.realtime}" if args.realtime else "normal priority"
        print(
            f"# cross-border link, frame {args.frame or '20ms'}, the pair at {priority}, {load()}",
            flush=True,
        )
        if args.realtime:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.realtime))
        run_async(_collect(Path(folder) / "pair", bursts, cuts, deaths, rows, args.frame))
        if args.realtime:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        rows += cpu(Path(folder), 100, 10, seconds, args.realtime, args.frame)
    print("| figure | n | p50 (ms) / value | p99 (ms) | note |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row)
    print(f"({load()} after)")


async def _collect(
    folder: Path,
    bursts: int,
    cuts: int,
    deaths: int,
    rows: list[str],
    frame: str = "",
    budget: list[str] | None = None,
    codecs: str = "",
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    trace = budget is not None
    rows += await latency_and_cut(folder, bursts, cuts, deaths, trace, frame, budget, codecs)


def delay_only(bursts: int, frame: str, realtime: int, codecs: str = "") -> None:
    """``--delay``: the mouth-to-ear rows, and each condition's traced budget."""
    rows: list[str] = []
    budget: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-links-") as folder:
        priority = f"SCHED_FIFO {realtime}" if realtime else "normal priority"
        what = f"frame {frame or '20ms'}, codecs {codecs or 'default'}, {priority}"
        print(f"# link delay, {what}, {load()}", flush=True)
        if realtime:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(realtime))
        run_async(_collect(Path(folder) / "pair", bursts, 0, 0, rows, frame, budget, codecs))
        if realtime:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    print("| figure | n | p50 (ms) / value | p99 (ms) | note |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row)
    print("\n| step | mean (ms) | p50 (ms) | what |")
    print("|---|---|---|---|")
    for row in budget:
        print(row)
    print(f"({load()} after)")


if __name__ == "__main__":
    main()
