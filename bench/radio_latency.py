"""Radio→radio latency, squelch-open → audio, and clock drift, through real sound-card ports.

    .venv/bin/python bench/radio_latency.py                     # both periods, 10-minute drift run
    .venv/bin/python bench/radio_latency.py --drift-minutes 2   # shorter drift run
    .venv/bin/python bench/radio_latency.py --periods 256 --bursts 10
    .venv/bin/python bench/radio_latency.py --periods 256 --drift-minutes 0 --frame 10ms --realtime

For each JACK dummy period (48 kHz) this starts its own uniquely named jackd, then:

1. *server baseline*: a PortAudio pass-through stream (input copied to output in the
   callback) — the audio server's own buffering, which the budget excludes;
2. *radio→radio*: a real Gateway with two soundcard ports on its real clock; a JACK
   client plays radio A a tone burst ending in a 100 ms chirp, records radio B, and
   finds the chirp by cross-correlation. Added = measured − baseline (p50, p99);
3. *squelch-open → audio*: in the same bursts, the VOX squelch is shut before each;
   the burst's onset at B minus its onset at A, minus the steady (chirp) delay, is what
   opening the squelch costs beyond the path;
4. *drift*: the gateway runs ``--drift-minutes`` with a steady tone (``--overs``: a
   conversation), its cards ``--card-ppm`` off its clock; reported are the
   drift-control ratios, FIFO levels, underruns, samples dropped and the chirp delay
   at the start and the end (a FIFO that grows shows as a delay that grows);
5. *the machine's stalls* during the drift run (``bench/stalls.py``: cyclictest at
   SCHED_FIFO 95 beside it), and how many of the underruns not blamed on an xrun came
   just after one (and how many would by chance), so an underrun is the machine's or ours.

Figures on a shared 2-core machine are noisy: look at medians, and at xruns; the load
average is printed with them. ``--realtime [PRIO]`` runs the gateway at SCHED_FIFO (3 by
default: above every normal task, below ``jackd -R`` (10) and its clients' process threads,
which JACK runs at 5; at 5 the tick held a card's thread off its CPU and JACK counted xruns),
as a production gateway runs beside ``jackd -R`` (systemd ``CPUSchedulingPolicy=fifo``).

The floor by construction is printed too: one engine frame (a frame must be whole before
the tick can mix it), plus one card period (the tick's phase against the card's callbacks
is arbitrary, so over time either the capture FIFO or the playback FIFO must hold up to
a period), plus the two rate converters' half-kernels (0.5 ms each). When the period is
the frame (960 at 20 ms) the period term goes: each callback brings one whole frame, the
tick mixes it before the next, and the server's own period (the baseline) covers the
wait for that. The FIFOs' margins and the jitter of ticks and callbacks come on top.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stalls import AFTER_S, BEFORE_S, Stalls, table  # noqa: E402
from tests.hardware.jackradio import (  # noqa: E402
    PASS_THROUGH,
    RATE,
    RadioSim,
    card_client,
    chirp,
    delay_of,
    portaudio_off,
    portaudio_on,
    site_toml,
    start_jackd,
    stop_jackd,
    tone,
)

RADIO = """
kind = "soundcard"
device = "system"
host_api = "JACK"
ptt_hang_time = "100ms"
tot = 0      # the drift run is one long over: no talker time-out
tx_tot = 0   # …and no transmit time-out
squelch = { type = "vox", threshold_dbfs = -45, hang = "100ms" }
"""


def onset(x: np.ndarray, threshold_db: float = -30.0, step: int = 48) -> int | None:
    """First 1 ms block above the threshold."""
    blocks = x[: len(x) - len(x) % step].reshape(-1, step)
    rms = np.sqrt(np.mean(np.square(blocks, dtype=np.float64), axis=1))
    loud = np.flatnonzero(20 * np.log10(np.maximum(rms, 1e-9)) > threshold_db)
    return int(loud[0]) * step if loud.size else None


def baseline(server: str, bursts: int) -> list[float]:
    """Delay of a pass-through stream: the audio server's own buffering.

    The stream is served by the cards' C callback with one lane whose capture ring is
    its playback ring: each period's input is played in the same callback.
    """
    import sounddevice as sd
    from gateway.hardware.card_process import COUNTERS, Lane, StreamCallback, open_stream
    from gateway.hardware.ring import SharedRing

    loop = SharedRing(memoryview(bytearray(SharedRing.nbytes(1 << 14))), 1 << 14)
    status = np.zeros(COUNTERS, np.int64)
    callback = StreamCallback(status, np.zeros(1), 1, 1, [Lane.between(loop, loop, status, 0, 0)])
    from gateway.hardware.devices import find_card

    card = find_card("system", "JACK")
    stream = open_stream(sd, card.index, RATE, 1, 1, 0, "low", callback, lambda: None)
    sim = RadioSim(server, 1, seconds=bursts * 0.5 + 5)
    sim.connect(0, PASS_THROUGH)
    probe = chirp(500, 3000, 0.1, -12)
    delays = []
    try:
        for _ in range(bursts):
            at = sim.start(0, probe)
            while sim.frame < at + len(probe) + RATE // 5:
                time.sleep(0.01)
            lag, coef = delay_of(probe, sim.recorded(0, since=at))
            if coef > 0.7:
                delays.append(lag / RATE)
    finally:
        sim.close()
        stream.close()
    return delays


def through_gateway(
    server: str,
    bursts: int,
    drift_seconds: float,
    tmp: Path,
    frame: str = "20ms",
    margin: str = "1ms",
    overs: bool = False,
    card_ppm: float = 0.0,
) -> dict:
    from gateway.app import Gateway
    from gateway.config import load_config

    path = tmp / "site.toml"
    timing = f'[timing]\nframe = "{frame}"\n'
    radio = RADIO + f'buffer_margin = "{margin}"\n'
    path.write_text(site_toml({"radio_a": radio, "radio_b": radio}, extra=timing))
    gw = Gateway(load_config(path))
    # JACK's dummy backend keeps the host's clock, so its "cards" cannot drift. A card whose
    # crystal runs card_ppm fast is, to the drift control, the same as an engine whose
    # ticks come card_ppm slow against the cards: that is what is set here.
    gw.clock.period *= 1 + card_ppm * 1e-6
    sim = RadioSim(server, 2, seconds=bursts * 1.2 + drift_seconds + 30)
    sim.connect(0, card_client("radio_a"))
    sim.connect(1, card_client("radio_b"))
    probe = chirp(500, 3000, 0.1, -12)
    burst = np.concatenate([tone(1000, 0.3, -12), probe])
    out: dict = {"delay": [], "squelch": [], "bad": 0}

    def events() -> tuple[float, ...]:
        """So far: samples dropped, rx underruns (A), tx underruns (B), xruns (both cards),
        underruns in all four FIFOs, those of them next to an xrun, and margin widenings."""
        a, b = gw.ports["radio_a"].card.stats(), gw.ports["radio_b"].card.stats()
        return (
            a["dropped_samples"] + b["dropped_samples"],
            a["rx_underruns"],
            b["tx_underruns"],
            a["xruns"] + b["xruns"],
            sum(c["rx_underruns"] + c["tx_underruns"] for c in (a, b)),
            a["underruns_after_xruns"] + b["underruns_after_xruns"],
            a["margin_widenings"] + b["margin_widenings"],
        )

    def measure_burst() -> tuple[float, float] | None:
        at = sim.start(0, burst)
        while sim.frame < at + len(burst) + RATE // 3:
            time.sleep(0.01)
        heard = sim.recorded(1, since=at)
        lag, coef = delay_of(probe, heard)
        first = onset(heard)
        if coef < 0.7 or first is None:
            out["bad"] += 1
            return None
        steady = (lag - (len(burst) - len(probe))) / RATE
        return steady, first / RATE - steady

    def scenario() -> None:
        t0 = time.monotonic()
        while gw.engine.tick_count < 100 and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        time.sleep(1.0)  # let the drift control settle its first windows
        for _ in range(bursts):
            got = measure_burst()
            if got:
                out["delay"].append(got[0])
                out["squelch"].append(got[1])
            time.sleep(0.3)  # squelch closes (hang 100 ms) before the next burst
        if drift_seconds:
            first = measure_burst()
            start = time.monotonic()
            if overs:  # a conversation: 4 s overs, 2 s pauses (squelch and PTT drop)
                sim.start(0, np.concatenate([tone(1000, 4.0, -12), np.zeros(2 * RATE)]), loop=True)
            else:
                sim.start(0, tone(1000, 1.0, -12), loop=True)
            samples = []
            stalls = Stalls(drift_seconds).start() if shutil.which("cyclictest") else None
            before = events()
            xrun_times, widen_times, seen = [], [], before
            late_before, worst_tick = gw.clock.late_ticks, 0.0
            while time.monotonic() - start < drift_seconds:
                time.sleep(1.0)
                a, b = gw.ports["radio_a"].card.stats(), gw.ports["radio_b"].card.stats()
                samples.append(
                    (
                        a["rx_ratio_ppm"],
                        b["tx_ratio_ppm"],
                        a["rx_low_water_seconds"],
                        b["tx_low_water_seconds"],
                        a["rx_margin_seconds"],
                        b["tx_margin_seconds"],
                        time.monotonic(),
                    )
                )
                now, second = events(), round(time.monotonic() - start)
                if now[3] > seen[3]:
                    xrun_times.append(second)
                if now[6] > seen[6]:
                    widen_times.append(second)
                seen = now
                worst_tick = max(worst_tick, float(gw.clock.lateness.recent().max()))
            during = [now - was for now, was in zip(events(), before, strict=True)]
            if stalls:
                stalls.stop()
            underruns = [
                u
                for p in ("radio_a", "radio_b")
                for u in gw.ports[p].card.underruns
                if u.when >= start
            ]
            sim.silence(0)
            time.sleep(0.5)
            last = measure_burst()
            out["drift"] = {
                "seconds": time.monotonic() - start,
                "samples": samples,
                "first": first,
                "last": last,
                "during": during,
                "xrun_times": xrun_times,
                "widen_times": widen_times,
                "worst_tick": worst_tick,
                "margins": (
                    gw.ports["radio_a"].card.rx_control.target,
                    gw.ports["radio_b"].card.tx_control.target,
                ),
                "late_ticks": gw.clock.late_ticks - late_before,
                "stalls": stalls,
                "underruns": underruns,
                "phase_moves": gw.phase_lock.moves,
                "phase_moved": gw.phase_lock.moved,
                "sim_underruns": sim.underruns,
            }
        out["stats_a"] = gw.ports["radio_a"].card.stats()
        out["stats_b"] = gw.ports["radio_b"].card.stats()

    try:
        run_beside(gw, scenario)
    finally:
        sim.close()
    return out


def run_beside(gw, work: Callable[[], None]) -> None:
    """Run the gateway on its own loop while ``work`` runs on a thread; then stop it."""

    async def main() -> None:
        run = asyncio.create_task(gw.run())
        try:
            await asyncio.get_running_loop().run_in_executor(None, work)
        finally:
            gw.stop()
            await run

    asyncio.run(main())


def go_realtime(priority: int) -> None:
    """SCHED_FIFO ``priority`` for this process (its threads inherit it), memory locked: as
    a realtime service runs (systemd CPUSchedulingPolicy=fifo, LimitMEMLOCK=infinity)."""
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    from gateway.hardware.card_process import lock_memory

    lock_memory()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def floor_ms(frame: str, period: int) -> float:
    """Frame + period + both half-kernels: the least a radio hop can add (see the docstring)."""
    from gateway.hardware.soundcard import ZERO_CROSSINGS

    from gateway.units import parse_duration

    seconds = parse_duration(frame)
    phase = 0.0 if period == round(seconds * RATE) else period / RATE
    return (seconds + phase + 2 * ZERO_CROSSINGS / 16000) * 1000


def slices(samples: list[tuple], underruns: list, stalls: Stalls | None, width: float) -> str:
    """One row per ``width`` seconds of the drift run: underruns by cause, the margins and
    buffers at its end, the control's median ratio, and the machine's stalls in it. A run
    whose margins stop widening and whose buffers stay put row after row neither underruns
    (for want of margin) nor grows."""
    if not samples:
        return "  (no samples)"
    s = np.array(samples)
    t0 = s[0, 6] - 1.0
    lines = [
        f"{'minutes':>11} {'margin':>6} {'xrun':>4} {'start':>5} {'rx/tx margin ms':>15} "
        f"{'rx/tx low-water ms':>21} {'rx/tx ppm':>11} {'stalls ≥5 ms':>12}"
    ]
    lo = t0
    while lo < s[-1, 6]:
        hi = lo + width
        row = s[(s[:, 6] > lo) & (s[:, 6] <= hi)]
        if len(row):
            causes = [u.cause for u in underruns if lo < u.when <= hi]
            late = len([x for x, _ in stalls.late(0.005) if lo < x <= hi]) if stalls else "–"
            lines.append(
                f"{(lo - t0) / 60:>5.1f}–{(hi - t0) / 60:<5.1f} {causes.count('margin'):>6} "
                f"{causes.count('xrun'):>4} {causes.count('start'):>5} "
                f"{row[-1, 4] * 1000:>7.1f}/{row[-1, 5] * 1000:<7.1f} "
                f"{np.median(row[:, 2]) * 1000:>10.1f}/{np.median(row[:, 3]) * 1000:<10.1f} "
                f"{np.median(row[:, 0]):>5.0f}/{np.median(row[:, 1]):<5.0f} {late:>12}"
            )
        lo = hi
    lines.append(
        "  underruns (all four FIFOs) by cause: 'margin' = the margin was short (it then "
        "widens), 'xrun' = next to the audio server's own xrun, 'start' = a stream's "
        "first 3 s; margins: A's rx and B's tx at the row's end; low-water: their "
        "median over the row, the level the control holds at the margin."
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--periods", type=int, nargs="+", default=[256, 960])
    parser.add_argument("--bursts", type=int, default=20)
    parser.add_argument("--drift-minutes", type=float, default=10.0)
    parser.add_argument("--frame", default="20ms", help="engine frame: 20ms or 10ms")
    parser.add_argument(
        "--overs",
        action="store_true",
        help="drift run as a conversation (4 s overs, 2 s pauses), not one over",
    )
    parser.add_argument(
        "--card-ppm",
        type=float,
        default=0.0,
        help="the cards run this many ppm fast against the engine (negative: "
        "slow), as a cheap card's crystal does (±100 ppm); JACK's dummy "
        "server cannot drift, so the engine's ticks are slowed instead",
    )
    parser.add_argument(
        "--slice-minutes",
        type=float,
        default=10.0,
        help="the drift run's time table: one row per this many minutes",
    )
    parser.add_argument(
        "--margin",
        default="1ms",
        help="the radios' buffer_margin (the base the learnt margin grows from)",
    )
    parser.add_argument(
        "--realtime",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="PRIO",
        help="run the gateway at SCHED_FIFO priority PRIO (default 3: above "
        "every normal task, below the audio server (10) and its clients' "
        "process threads (5); needs root or CAP_SYS_NICE)",
    )
    args = parser.parse_args()
    if args.realtime:
        go_realtime(args.realtime)
    load_before = os.getloadavg()[0]
    rows = []
    drift_rows = []
    stall_reports = []
    slice_reports = []
    for period in args.periods:
        server = f"blbench{os.getpid()}p{period}"
        jackd = start_jackd(server, period=period)
        try:
            portaudio_on(server)
            base = baseline(server, args.bursts)
            with tempfile.TemporaryDirectory() as tmp:
                res = through_gateway(
                    server,
                    args.bursts,
                    args.drift_minutes * 60,
                    Path(tmp),
                    args.frame,
                    args.margin,
                    args.overs,
                    args.card_ppm,
                )
        finally:
            portaudio_off()
            stop_jackd(jackd)
        b = statistics.median(base) if base else float("nan")
        added = [d - b for d in res["delay"]]
        rows.append(
            (
                period,
                b * 1000,
                pct(res["delay"], 50),
                pct(added, 50),
                pct(added, 99),
                floor_ms(args.frame, period),
                pct(res["squelch"], 50),
                pct(res["squelch"], 99),
                len(res["delay"]),
                res["bad"],
                res["stats_a"]["xruns"] + res["stats_b"]["xruns"],
                res["stats_a"]["rx_underruns"] + res["stats_b"]["tx_underruns"],
            )
        )
        print(
            f"period {period}: baseline {b * 1000:.1f} ms, delays (ms) "
            f"{[round(d * 1000, 1) for d in res['delay']]}",
            flush=True,
        )
        if "drift" in res:
            d = res["drift"]
            s = np.array(d["samples"]) if d["samples"] else np.zeros((1, 7))
            drift_rows.append(
                (
                    period,
                    d["seconds"] / 60,
                    s[:, 0].min(),
                    np.median(s[:, 0]),
                    s[:, 0].max(),
                    s[:, 1].min(),
                    np.median(s[:, 1]),
                    s[:, 1].max(),
                    s[:, 2].min() * 1000,
                    s[:, 2].max() * 1000,
                    s[:, 3].min() * 1000,
                    s[:, 3].max() * 1000,
                    (d["first"] or (float("nan"),))[0] * 1000,
                    (d["last"] or (float("nan"),))[0] * 1000,
                    *d["during"],
                )
            )
            print(
                f"period {period}: ticks moved to mid-cycle of the cards' period "
                f"{d['phase_moves']} times, {d['phase_moved'] * 1000:+.1f} ms in all",
                flush=True,
            )
            print(
                f"period {period}: engine ticks in the drift run: {d['late_ticks']} more than a "
                f"frame late, the latest {d['worst_tick'] * 1000:.1f} ms; the simulator's "
                f"own underruns: {d['sim_underruns']}",
                flush=True,
            )
            print(
                f"period {period}: xruns in the drift run at seconds {d['xrun_times'][:30]}; "
                f"margins widened at seconds {d['widen_times'][:30]}; margins at "
                f"the end: A rx {d['margins'][0] * 1000:.1f} ms, B tx "
                f"{d['margins'][1] * 1000:.1f} ms",
                flush=True,
            )
            stall_reports.append((period, d["stalls"], d["underruns"]))
            slice_reports.append((period, d["samples"], d["underruns"], d["stalls"]))
    priority = f"SCHED_FIFO {args.realtime}" if args.realtime else "normal priority"
    print(
        f"\nRadio → radio through the gateway (JACK dummy, 48 kHz; engine {args.frame} frames, "
        f"16 kHz; {priority}; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after)"
    )
    print(
        f"{'period':>6} {'server ms':>9} {'total p50':>9} {'added p50':>9} {'added p99':>9} "
        f"{'floor':>6} {'sq→audio p50':>12} {'p99':>6} {'bursts':>6} {'bad':>4} {'xruns':>5} "
        f"{'underruns':>9}"
    )
    for r in rows:
        print(
            f"{r[0]:>6} {r[1]:>9.1f} {r[2]:>9.1f} {r[3]:>9.1f} {r[4]:>9.1f} {r[5]:>6.1f} "
            f"{r[6]:>12.1f} {r[7]:>6.1f} {r[8]:>6} {r[9]:>4} {r[10]:>5.0f} {r[11]:>9.0f}"
        )
    print("  added = total − server baseline (a PortAudio pass-through on the same server);")
    print(
        "  floor = engine frame + card period (none when it is the frame) + both rate "
        "converters' half-kernels;"
    )
    print("  sq→audio = onset delay of a burst after a shut squelch, beyond the steady delay.")
    if drift_rows:
        what = "4 s overs, 2 s pauses" if args.overs else "steady tone"
        print(
            f"\nClock drift ({what} through A→B; the cards {args.card_ppm:+.0f} ppm against "
            "the engine)"
        )
        print(
            f"{'period':>6} {'minutes':>7} {'rx ppm min/med/max':>20} {'tx ppm min/med/max':>20} "
            f"{'rx low ms':>11} {'tx low ms':>11} {'delay start':>11} {'delay end':>9} "
            f"{'dropped':>8} {'rx under':>8} {'tx under':>8} {'xruns':>5} {'all under':>9} "
            f"{'by xrun':>7} {'widened':>7}"
        )
        for r in drift_rows:
            print(
                f"{r[0]:>6} {r[1]:>7.1f} {r[2]:>6.0f}/{r[3]:>5.0f}/{r[4]:<6.0f} "
                f"{r[5]:>6.0f}/{r[6]:>5.0f}/{r[7]:<6.0f} {r[8]:>5.1f}–{r[9]:<5.1f} "
                f"{r[10]:>5.1f}–{r[11]:<5.1f} {r[12]:>11.1f} {r[13]:>9.1f} {r[14]:>8.0f} "
                f"{r[15]:>8.0f} {r[16]:>8.0f} {r[17]:>5.0f} {r[18]:>9.0f} {r[19]:>7.0f} "
                f"{r[20]:>7.0f}"
            )
        print(
            "  ppm = drift-control ratio (1 s samples); low = the FIFO's low-water mark (its "
            "least level over a half-second window, which the control holds at the margin), "
            "min–max over the run; "
            "dropped, underruns and xruns count the drift run only (the latency table's "
            "columns count from the start); xruns add both cards' (one server xrun counts "
            "2); 'all under' = underruns in all four FIFOs (both ways on both cards), 'by "
            "xrun' = those within 0.5 s of an xrun that skipped stream time, the audio "
            "server's loss; 'widened' = "
            "times a margin widened (all four FIFOs), for a dip or an underrun."
        )
    for period, samples, underruns, stalls in slice_reports:
        print(
            f"\nThe drift run slice by slice (period {period}): does anything underrun or "
            "grow as the hours pass?"
        )
        print(slices(samples, underruns, stalls, args.slice_minutes * 60))
    for period, stalls, underruns in stall_reports:
        print(f"\nThe machine's stalls in the drift run (period {period})")
        if stalls is None:
            print("  cyclictest not found: apt-get install rt-tests to see them")
            continue
        print(table(stalls))
        ours = [u for u in underruns if u.cause == "margin"]
        print(
            f"underruns blamed on the margin (not an xrun, not the first 3 s): {len(ours)} "
            f"(rx {sum(u.way == 'rx' for u in ours)}, tx {sum(u.way == 'tx' for u in ours)}) "
            f"of {len(underruns)}; each underrun (both cards): second, way, blamed on, how "
            "late its feeder came (rx: the card, tx: the media tick), stream time the "
            "server lost around it, the machine's worst stall just before"
        )
        for u in underruns:
            print(
                f"  {u.when - stalls.started:6.1f} s  {u.way}  "
                f"{u.cause:<6}  late {u.late * 1000:5.1f} ms  "
                f"lost {u.lost * 1000:5.1f} ms  stall {stalls.worst_near(u.when) * 1000:5.1f} ms"
            )
        print(f"{'stall ≥':>8} {'underruns just after one':>24} {'by chance':>9}")
        for ms in (2, 5, 10):
            hit = sum(stalls.explains(u.when, ms / 1000) for u in ours)
            print(f"{ms:>5} ms {hit:>24} {stalls.cover(ms / 1000) * len(ours):>9.1f}")
        print(
            f"  'just after' = a realtime wake-up that late ended {BEFORE_S * 1000:.0f} ms "
            f"before the underrun or {AFTER_S * 1000:.0f} ms after; 'by chance' = how many "
            "would, if underruns fell at random times (the share of the run so covered)."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
