"""Radio→radio latency and dropouts, through real sound-card ports on a JACK dummy server.

    .venv/bin/python bench/radio_latency.py                          # period 256, 60 s tone
    .venv/bin/python bench/radio_latency.py --load 1                 # stress-ng --cpu 1 beside
    .venv/bin/python bench/radio_latency.py --periods 256 960 --frame 10ms --realtime
    .venv/bin/python bench/radio_latency.py --server mine                # jackd -n minep256

For each JACK dummy period (48 kHz) this starts its own jackd (``--server`` names it,
default unique to the run; the period is appended), then:

1. *server baseline*: a PortAudio pass-through stream (input copied to output in the
   callback): the audio server's own buffering;
2. *radio→radio*: a real Gateway with two soundcard ports on its real clock; a JACK
   client plays radio A a tone burst ending in a 100 ms chirp, records radio B, and
   finds the chirp by cross-correlation: the raw total (p50, p99), and added = total −
   baseline. Also squelch-open → audio: a burst's onset at B beyond the steady delay;
3. *dropouts*: ``--tone-seconds`` of a steady 1 kHz tone A → B (``--card-ppm``: the
   cards that far off the engine; JACK's dummy server cannot drift, so the engine's
   ticks are slowed instead). B's recording is cut in 1 ms blocks: a block 6 dB or more
   below the tone's level is a *gap*; a step of the tone's phase between blocks of more
   than 0.5 rad is a *jump* (the audio skipped or repeated). Gaps and jumps within 20 ms
   of each other are one *glitch*. Also the pitch error (median, and the worst second)
   and the gateway's own counts: underruns, xruns, samples dropped, margin widenings;
   and the CPU the gateway's process and its card processes used over the tone (% of
   one core; the radio simulator, jackd and stress-ng are not counted).

``--load N`` runs ``stress-ng --cpu N`` beside the whole run (it stops by itself).
Figures on a shared 2-core machine are noisy: the load average is printed with them.
``--realtime [PRIO]`` runs the gateway at SCHED_FIFO (3 by default: above every normal
task, below ``jackd -R`` (10) and its clients' threads (5)).

The floor by construction is printed too: one engine frame (a frame must be whole before
the tick can mix it), plus one card period (the tick's phase against the card's callbacks
is arbitrary, so the capture FIFO or the playback FIFO must hold up to a period), plus the
two rate converters' half-kernels (0.5 ms each). When the period is the frame (960 at
20 ms) the period term goes. The FIFOs' margins, the other FIFO's period and transmit's
late-tick allowance (``LATE_TICK_S``) come on top.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
tot = 0      # the tone is one long over: no talker time-out
tx_tot = 0   # …and no transmit time-out
squelch = { type = "vox", threshold_dbfs = -45, hang = "100ms" }
"""
TONE_HZ = 1000.0
TONE_DBFS = -12.0
BLOCK = RATE // 1000  # 1 ms
GAP_DB = 6.0
JUMP_RAD = 0.5
GLITCH_JOIN = 20  # blocks: a gap and a jump this close are one glitch
COUNTS = ("rx_underruns", "tx_underruns", "xruns", "dropped_samples", "margin_widenings")


def onset(x: np.ndarray, threshold_db: float = -30.0, step: int = BLOCK) -> int | None:
    """First 1 ms block above the threshold."""
    blocks = x[: len(x) - len(x) % step].reshape(-1, step)
    rms = np.sqrt(np.mean(np.square(blocks, dtype=np.float64), axis=1))
    loud = np.flatnonzero(20 * np.log10(np.maximum(rms, 1e-9)) > threshold_db)
    return int(loud[0]) * step if loud.size else None


def glitches(x: np.ndarray, hz: float = TONE_HZ, rate: int = RATE) -> dict[str, float]:
    """Gaps, phase jumps and glitch events in a recording of a steady tone (see above)."""
    x = x[: len(x) - len(x) % BLOCK].astype(np.float64)
    t = np.arange(len(x)) / rate
    z = (x * np.exp(-2j * np.pi * hz * t)).reshape(-1, BLOCK).mean(axis=1)
    level = 20 * np.log10(np.maximum(np.abs(z), 1e-12))
    gaps = level < np.median(level) - GAP_DB
    step = np.angle(z[1:] * np.conj(z[:-1]))  # phase advance per block (rad)
    usual = np.median(step)
    jumps = np.zeros(len(z), bool)
    jumps[1:] = (np.abs(np.angle(np.exp(1j * (step - usual)))) > JUMP_RAD) & ~gaps[1:] & ~gaps[:-1]
    bad = np.flatnonzero(gaps | jumps)
    events = int(np.sum(np.diff(bad) > GLITCH_JOIN)) + 1 if bad.size else 0
    # pitch: the phase advance per block against the tone's own (2π·hz/1000 per block)
    ppm = usual / (2 * np.pi * hz * BLOCK / rate) * 1e6
    per_second = [np.median(step[i : i + 1000]) for i in range(0, len(step) - 999, 1000)]
    worst = max((abs(s / (2 * np.pi * hz * BLOCK / rate) * 1e6) for s in per_second), default=0)
    return {
        "gaps": int(gaps.sum()),
        "jumps": int(jumps.sum()),
        "glitches": events,
        "pitch_ppm": float(ppm),
        "worst_second_ppm": float(worst),
    }


def baseline(server: str, bursts: int) -> list[float]:
    """Delay of a pass-through stream (the cards' C callback, one lane whose capture ring is
    its playback ring): the audio server's own buffering."""
    import sounddevice as sd
    from gateway.hardware.card_process import COUNTERS, Lane, StreamCallback, open_stream
    from gateway.hardware.devices import find_card
    from gateway.hardware.ring import SharedRing

    loop = SharedRing(memoryview(bytearray(SharedRing.nbytes(1 << 14))), 1 << 14)
    status = np.zeros(COUNTERS, np.int64)
    callback = StreamCallback(status, np.zeros(1), 1, 1, [Lane.between(loop, loop, status, 0, 0)])
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
    tone_seconds: float,
    tmp: Path,
    frame: str,
    margin: str | None,
    card_ppm: float,
) -> dict:
    from gateway.app import Gateway
    from gateway.config import load_config

    path = tmp / "site.toml"
    radio = RADIO + (f'buffer_margin = "{margin}"\n' if margin else "")
    path.write_text(
        site_toml({"radio_a": radio, "radio_b": radio}, extra=f'[timing]\nframe = "{frame}"\n')
    )
    gw = Gateway(load_config(path))
    gw.clock.period *= 1 + card_ppm * 1e-6
    sim = RadioSim(server, 2, seconds=bursts * 1.2 + tone_seconds + 30)
    sim.connect(0, card_client("radio_a"))
    sim.connect(1, card_client("radio_b"))
    probe = chirp(500, 3000, 0.1, -12)
    burst = np.concatenate([tone(1000, 0.3, -12), probe])
    out: dict = {"delay": [], "squelch": [], "bad": 0}

    def counts() -> dict[str, float]:
        a, b = gw.ports["radio_a"].card.stats(), gw.ports["radio_b"].card.stats()
        return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in COUNTS}

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
        time.sleep(1.0)
        for _ in range(bursts):
            got = measure_burst()
            if got:
                out["delay"].append(got[0])
                out["squelch"].append(got[1])
            time.sleep(0.3)  # squelch closes (hang 100 ms) before the next burst
        if tone_seconds:
            start = sim.start(0, tone(TONE_HZ, 1.0, TONE_DBFS), loop=True)
            time.sleep(2.0)  # squelch open, PTT up, B playing
            before, since, cpu, late = counts(), sim.frame, cpu_seconds(), gw.clock.late_ticks
            time.sleep(tone_seconds)
            during = {k: v - before[k] for k, v in counts().items()}
            used = [(b - a) / tone_seconds * 100 for a, b in zip(cpu, cpu_seconds(), strict=True)]
            heard = sim.recorded(1, since=max(since, start))
            sim.silence(0)
            out["tone"] = {
                **glitches(heard),
                **during,
                "seconds": len(heard) / RATE,
                "late_ticks": gw.clock.late_ticks - late,
                "cpu_gateway": used[0],
                "cpu_cards": used[1],
            }

    try:
        run_beside(gw, scenario)
    finally:
        sim.close()
    return out


def cpu_seconds() -> tuple[float, float]:
    """CPU time so far of this process (the gateway) and of its card processes (children
    started as ``python -I -S -c``: ``card_process.card_command``), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    me, cards = str(os.getpid()), 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        if fields[1] == me and command[1:4] == [b"-I", b"-S", b"-c"]:
            cards += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return time.process_time(), cards


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
    """SCHED_FIFO ``priority`` for this process (its threads inherit it), memory locked."""
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    from gateway.hardware.card_process import lock_memory

    lock_memory()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def floor_ms(frame: str, period: int) -> float:
    """Frame + period + both half-kernels: the least a radio hop can add (see above)."""
    from gateway.units import parse_duration

    seconds = parse_duration(frame)
    phase = 0.0 if period == round(seconds * RATE) else period / RATE
    return (seconds + phase + 0.001) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--periods", type=int, nargs="+", default=[256])
    parser.add_argument("--bursts", type=int, default=20)
    parser.add_argument("--tone-seconds", type=float, default=60.0)
    parser.add_argument("--server", default=f"blbench{os.getpid()}", help="jackd -n prefix")
    parser.add_argument("--frame", default="20ms", help="engine frame: 20ms or 10ms")
    parser.add_argument("--margin", default=None, help="the radios' buffer_margin")
    parser.add_argument(
        "--card-ppm",
        type=float,
        default=0.0,
        help="the cards run this many ppm fast against the engine",
    )
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        metavar="N",
        help="run stress-ng --cpu N beside the whole run",
    )
    parser.add_argument(
        "--realtime",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="PRIO",
        help="run the gateway at SCHED_FIFO priority PRIO",
    )
    args = parser.parse_args()
    if args.realtime:
        go_realtime(args.realtime)
    stress = None
    if args.load:
        limit = len(args.periods) * (args.bursts * 2 + args.tone_seconds + 90)
        stress = subprocess.Popen(
            [
                shutil.which("stress-ng") or "stress-ng",
                "--cpu",
                str(args.load),
                "--timeout",
                f"{limit:.0f}s",
                "--quiet",
            ]
        )
    load_before = os.getloadavg()[0]
    rows, tones = [], []
    try:
        for period in args.periods:
            server = f"{args.server}p{period}"
            jackd = start_jackd(server, period=period)
            try:
                portaudio_on(server)
                base = baseline(server, args.bursts)
                # PortAudio's JACK client runs a thread on every period in this process,
                # which is the gateway's below: a real gateway opens no stream itself.
                portaudio_off()
                with tempfile.TemporaryDirectory() as tmp:
                    res = through_gateway(
                        server,
                        args.bursts,
                        args.tone_seconds,
                        Path(tmp),
                        args.frame,
                        args.margin,
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
                    pct(res["delay"], 99),
                    pct(added, 50),
                    pct(added, 99),
                    floor_ms(args.frame, period),
                    pct(res["squelch"], 50),
                    len(res["delay"]),
                    res["bad"],
                )
            )
            if "tone" in res:
                tones.append((period, res["tone"]))
    finally:
        if stress is not None:
            stress.terminate()
            stress.wait()
    priority = f"SCHED_FIFO {args.realtime}" if args.realtime else "normal priority"
    load = f"stress-ng --cpu {args.load} beside" if args.load else "no load added"
    print(
        f"\nRadio → radio (JACK dummy, 48 kHz; engine {args.frame} frames; {priority}; {load}; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after)"
    )
    print(
        f"{'period':>6} {'server':>6} {'total p50':>9} {'total p99':>9} {'added p50':>9} "
        f"{'added p99':>9} {'floor':>6} {'sq→audio':>8} {'bursts':>6} {'bad':>4}"
    )
    for r in rows:
        print(
            f"{r[0]:>6} {r[1]:>6.1f} {r[2]:>9.1f} {r[3]:>9.1f} {r[4]:>9.1f} {r[5]:>9.1f} "
            f"{r[6]:>6.1f} {r[7]:>8.1f} {r[8]:>6} {r[9]:>4}"
        )
    print(
        "  ms; total = raw delay A in → B out; added = total − server (a pass-through "
        "stream); floor = frame + period (none when it is the frame) + 1 ms of resampling"
    )
    if tones:
        print(f"\nSteady {TONE_HZ:.0f} Hz tone A → B, cards {args.card_ppm:+.0f} ppm")
        print(
            f"{'period':>6} {'seconds':>7} {'glitches':>8} {'gaps':>5} {'jumps':>5} "
            f"{'pitch ppm':>9} {'worst s':>7} {'rx/tx under':>11} {'xruns':>5} "
            f"{'dropped':>7} {'widened':>7} {'late ticks':>10} {'CPU gw %':>8} {'cards %':>7}"
        )
        for period, t in tones:
            print(
                f"{period:>6} {t['seconds']:>7.1f} {t['glitches']:>8} {t['gaps']:>5} "
                f"{t['jumps']:>5} {t['pitch_ppm']:>+9.1f} {t['worst_second_ppm']:>7.0f} "
                f"{t['rx_underruns']:>5.0f}/{t['tx_underruns']:<5.0f} {t['xruns']:>5.0f} "
                f"{t['dropped_samples']:>7.0f} {t['margin_widenings']:>7.0f} "
                f"{t['late_ticks']:>10} {t['cpu_gateway']:>8.1f} {t['cpu_cards']:>7.1f}"
            )
        print(
            f"  gaps = 1 ms blocks {GAP_DB:.0f} dB or more below the tone; jumps = steps of "
            f"its phase over {JUMP_RAD} rad; glitches = gaps and jumps, {GLITCH_JOIN} ms "
            "apart or more counted apart; counts are both cards' over the tone; CPU in % of "
            "one core: the gateway's process, and both card processes together"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
