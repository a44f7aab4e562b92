"""What a site with two JACK radios costs per 20 ms tick, idle and with a tone A → B.

    .venv/bin/python bench/tick_cost.py                    # CPU and tick time, both phases
    .venv/bin/python bench/tick_cost.py --profile 25       # …and the 25 costliest functions
    .venv/bin/python bench/tick_cost.py --server mine      # jackd -n mine

A real Gateway with two soundcard radios on a JACK dummy server of its own (48 kHz,
256 frames) and the tests' radio simulator (a process of its own, not counted). For each
phase (``--seconds`` idle, then the same with a steady 1 kHz tone played into radio A,
which B transmits), this prints the CPU of the gateway's process and of its card
processes (% of one core, from ``/proc``), and the engine's tick time (mean and p99, µs,
``time.thread_time`` around ``Engine.tick``: CPU, not wall time, so a loaded machine
does not inflate it): what the process spends outside the tick is the event loop's and
its threads'. ``--parts`` times the tick's parts (``PARTS``) one by one. ``--profile N``
runs each phase under cProfile (which slows Python calls: read its figures as shares,
not as times).

The issue's goal: gateway and card processes ≤ 3 % of a core together, about 600 µs per
20 ms tick for all of them.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.radio_latency import RADIO, cpu_seconds, run_beside  # noqa: E402
from tests.hardware.jackradio import (  # noqa: E402
    RadioSim,
    card_client,
    site_toml,
    start_jackd,
    stop_jackd,
    tone,
)

# What the tick calls, timed one by one with ``--parts`` (µs per tick, nested ones included
# in their callers' figures).
PARTS = (
    "gateway.radio.SoundcardPort.read",
    "gateway.radio.SoundcardPort.write",
    "gateway.radio.SoundcardPort.end_of_tick",
    "gateway.hardware.soundcard.SoundCard.read",
    "gateway.hardware.soundcard.SoundCard.write",
    "gateway.hardware.soundcard.SoundCard.end_of_tick",
    "gateway.hardware.elastic.ElasticFifo.capture",
    "gateway.hardware.elastic.ElasticFifo.take",
    "gateway.hardware.elastic.ElasticFifo.push",
    "gateway.hardware.elastic.ElasticFifo.end_of_tick",
    "gateway.hardware.ptt.PttController.fed",
    "gateway.engine.Engine._check_frames",
    "gateway.floor.FloorControl.update",
    "gateway.mixer.Mixer.mix",
    "gateway.floor.Keying.update",
    "gateway.engine.Engine._meter",
    "gateway.engine.Engine._talk_events",
)


def time_parts(totals: dict[str, float]) -> None:
    """Wrap each of PARTS so its calls add their time to ``totals``."""
    import importlib

    for dotted in PARTS:
        module, cls, name = dotted.rsplit(".", 2)
        owner = getattr(importlib.import_module(module), cls)
        inner = getattr(owner, name)

        def timed(*args, _inner=inner, _key=dotted, **kwargs):
            start = time.thread_time()
            try:
                return _inner(*args, **kwargs)
            finally:
                totals[_key] = totals.get(_key, 0.0) + time.thread_time() - start

        setattr(owner, name, timed)


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each of this process's threads, by Python name (else ``comm``)."""
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    used: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = names.get(int(task.name)) or stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return used


def phase(gw, seconds: float, profile: int, totals: dict[str, float] | None = None) -> dict:
    """CPU and tick times over ``seconds`` of the running gateway."""
    engine = gw.engine
    times: list[float] = []
    tick = engine.tick

    def timed(due: float | None = None) -> None:
        start = time.thread_time()
        tick(due)
        times.append(time.thread_time() - start)

    profiler = cProfile.Profile() if profile else None
    engine.tick = timed
    if totals is not None:
        totals.clear()
    threads = thread_cpu()
    before, ticks, wall = cpu_seconds(), engine.tick_count, time.monotonic()
    if profiler:
        gw.profiler = profiler  # enabled on the loop's thread by the clock task (see main)
    time.sleep(seconds)
    gw.profiler = None
    after, wall = cpu_seconds(), time.monotonic() - wall
    by_thread = {k: (v - threads.get(k, 0.0)) / wall * 100 for k, v in thread_cpu().items()}
    engine.tick = tick
    used = [(b - a) / wall * 100 for a, b in zip(before, after, strict=True)]
    out = {
        "ticks": engine.tick_count - ticks,
        "cpu_gateway": used[0],
        "cpu_cards": used[1],
        "tick_mean_us": float(np.mean(times)) * 1e6 if times else 0.0,
        "tick_p99_us": float(np.percentile(times, 99)) * 1e6 if times else 0.0,
        "late_ticks": gw.clock.late_ticks,
        "threads": {k: v for k, v in by_thread.items() if v > 0},
    }
    if totals:
        out["parts"] = {k: v / max(1, out["ticks"]) * 1e6 for k, v in totals.items()}
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(profile)
        out["profile"] = text.getvalue()
    return out


def run(
    server: str, seconds: float, frame: str, profile: int, parts: bool
) -> list[tuple[str, dict]]:
    from gateway.app import Gateway
    from gateway.config import load_config

    results: list[tuple[str, dict]] = []
    totals: dict[str, float] | None = {} if parts else None
    if totals is not None:
        time_parts(totals)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "site.toml"
        path.write_text(
            site_toml({"radio_a": RADIO, "radio_b": RADIO}, extra=f'[timing]\nframe = "{frame}"\n')
        )
        gw = Gateway(load_config(path))
        gw.profiler = None
        sim = RadioSim(server, 2, seconds=2 * seconds + 40)
        sim.connect(0, card_client("radio_a"))
        sim.connect(1, card_client("radio_b"))
        if profile:
            # cProfile sees only the thread it is enabled on: the loop's, once a tick.
            on_tick = gw.clock.on_tick

            def profiled_tick() -> None:
                profiler = gw.profiler
                active = getattr(gw, "_active", None)
                if profiler is not active:
                    if active:
                        active.disable()
                    if profiler:
                        profiler.enable()
                    gw._active = profiler
                on_tick()

            gw.clock.on_tick = profiled_tick

        def scenario() -> None:
            t0 = time.monotonic()
            while gw.engine.tick_count < 250 and time.monotonic() - t0 < 30:
                time.sleep(0.05)  # 5 s: the cards' cycles placed, the FIFOs settled
            results.append(("idle", phase(gw, seconds, profile, totals)))
            sim.start(0, tone(1000.0, 1.0, -12.0), loop=True)
            time.sleep(2.0)  # squelch open, PTT up, B playing
            results.append(("tone A → B", phase(gw, seconds, profile, totals)))
            sim.silence(0)
            gw.profiler = None
            time.sleep(0.1)

        try:
            run_beside(gw, scenario)
        finally:
            sim.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="each phase")
    parser.add_argument("--server", default=f"tickcost{os.getpid()}", help="jackd -n NAME")
    parser.add_argument("--frame", default="20ms")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile top N")
    parser.add_argument("--parts", action="store_true", help="time the tick's parts (PARTS)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    jackd = start_jackd(args.server)
    # The card processes find the server by this; PortAudio is not started here: its JACK
    # client would run a thread on every period in the gateway's process, as a real
    # gateway's (which opens no stream itself) does not.
    os.environ["JACK_DEFAULT_SERVER"] = args.server
    try:
        results = run(args.server, args.seconds, args.frame, args.profile, args.parts)
    finally:
        stop_jackd(jackd)
    print(
        f"\nTwo JACK radios (dummy, 48 kHz, 256 frames), engine {args.frame} frames; "
        f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(
        f"{'phase':<11} {'ticks':>6} {'CPU gw %':>8} {'cards %':>7} {'total %':>7} "
        f"{'tick µs':>8} {'p99 µs':>7}"
    )
    for name, r in results:
        print(
            f"{name:<11} {r['ticks']:>6} {r['cpu_gateway']:>8.2f} {r['cpu_cards']:>7.2f} "
            f"{r['cpu_gateway'] + r['cpu_cards']:>7.2f} {r['tick_mean_us']:>8.0f} "
            f"{r['tick_p99_us']:>7.0f}"
        )
    print("  CPU in % of one core; tick: Engine.tick's own time (the loop's is the rest)")
    for name, r in results:
        threads = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["threads"].items()))
        print(f"  {name:<11} threads (CPU %): {threads}")
    for name, r in results:
        for part, us in r.get("parts", {}).items():
            print(f"  {name:<11} {part:<52} {us:>7.1f} µs/tick")
    for name, r in results:
        if "profile" in r:
            print(f"\n--- {name}: cProfile, by own time ---\n{r['profile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
