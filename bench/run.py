"""Engine benchmarks: the mixing step, a whole tick, and media-clock lateness.

    .venv/bin/python bench/run.py            # the tables (about a minute)
    .venv/bin/python bench/run.py --quick    # fewer repeats, for a smoke run

Machines here are shared and noisy: every figure is the median of repeated runs,
and costs are also given per port so sizes can be compared as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from gateway.clock import MediaClock
from gateway.config import PortConfig, TalkgroupConfig, Timing
from gateway.engine import Engine
from gateway.mixer import Mixer
from gateway.ports import Port, PortBank
from gateway.site import single_thread_blas

TIMING = Timing()
N = TIMING.frame_samples


class BenchPort(Port):
    """The cheapest possible endpoint: a fixed frame when talking."""

    def __init__(self, name: str, talking: bool, frame: np.ndarray) -> None:
        super().__init__(name, PortConfig(kind="bench"), TIMING)
        self.talking = talking
        self.frame = frame

    def read(self) -> np.ndarray | None:
        return self.frame if self.talking else None


def time_calls(fn, ticks: int, repeats: int) -> float:
    """Median over repeats of the mean seconds per call."""
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(ticks):
            fn()
        results.append((time.perf_counter() - start) / ticks)
    return statistics.median(results)


def bench_mix(ports: int, groups: int, talking: float, ticks: int, repeats: int) -> float:
    rng = np.random.default_rng(1)
    frames = (rng.standard_normal((ports, N)) * 0.1).astype(np.float32)
    group_of = np.arange(ports) % groups
    weights = (rng.random(ports) < talking).astype(np.float32)
    gain = np.ones(ports, np.float32)
    mixer = Mixer(N, TIMING.rate)
    mixer.resize(ports)
    return time_calls(lambda: mixer.mix(frames, weights, group_of, groups, gain), ticks, repeats)


def bench_tick(ports: int, groups: int, talking: float, ticks: int, repeats: int) -> float:
    rng = np.random.default_rng(2)
    frame = (rng.standard_normal(N) * 0.1).astype(np.float32)
    port_list = [BenchPort(f"p{i}", rng.random() < talking, frame) for i in range(ports)]
    talkgroups = {
        f"tg{g}": TalkgroupConfig(members=[p.name for p in port_list[g::groups]])
        for g in range(groups)
    }
    engine = Engine(TIMING)
    engine.configure(port_list, talkgroups, {})
    for _ in range(5):
        engine.tick()
    return time_calls(engine.tick, ticks, repeats)


class BenchBank(PortBank):
    """Conference callers as a bank: every row talks a tone, moved in one copy each way."""

    def __init__(self, ports: int) -> None:
        phase = np.random.default_rng(3).random((ports, 1)) * 2 * np.pi
        t = np.arange(N) / TIMING.rate
        self.audio = (0.1 * np.sin(2 * np.pi * 500 * t + phase)).astype(np.float32)
        self.talking = np.ones(ports, bool)
        self.heard = np.zeros_like(self.audio)

    def read_frames(self, ports, frames, rows):  # noqa: ANN001, ANN201 - the PortBank API
        frames[rows] = self.audio
        return self.talking, self.talking

    def write_frames(self, ports, out, rows, audible):  # noqa: ANN001, ANN201
        np.take(out, rows, axis=0, out=self.heard)


def bench_conference(ports: int, banked: bool, ticks: int, repeats: int) -> float:
    """Every port talking in one talkgroup, as in a SIP load test: the engine's worst case."""
    bank = BenchBank(ports)
    port_list = [BenchPort(f"p{i}", True, bank.audio[i]) for i in range(ports)]
    if banked:
        for port in port_list:
            port.port_bank = bank
    engine = Engine(TIMING)
    engine.configure(port_list, {"conf": TalkgroupConfig(members=[p.name for p in port_list])}, {})
    for _ in range(5):
        engine.tick()
    return time_calls(engine.tick, ticks, repeats)


def bench_clock(ticks: int, use_uvloop: bool) -> dict[str, float]:
    clock = MediaClock(TIMING.frame, lambda: None)

    async def main() -> None:
        await clock.run(ticks=ticks)

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
    late = clock.lateness.recent() * 1000
    return {
        "p50": float(np.percentile(late, 50)),
        "p99": float(np.percentile(late, 99)),
        "max": float(late.max()),
        "late": clock.late_ticks,
        "last": float(late[-1]),  # the last tick against its deadline: drift shows here
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clock-ticks", type=int, default=1000)
    args = parser.parse_args()
    single_thread_blas()  # as the gateway runs (gateway.site.run_async)
    ticks, repeats = (20, 3) if args.quick else (100, 7)

    print("Mixing step (Mixer.mix): 10 % of ports talking, and every port talking (worst case)")
    print(
        f"{'ports':>6} {'groups':>6} | {'µs/tick':>9} {'µs/port':>8} {'% of 20ms':>9} "
        f"| {'µs/tick':>9} {'µs/port':>8} {'% of 20ms':>9}"
    )
    for ports in (10, 100, 1000, 2000):
        for groups in (1, 10, 100):
            if groups > ports:
                continue
            row = f"{ports:>6} {groups:>6}"
            for talking in (0.1, 1.0):
                s = bench_mix(ports, groups, talking, ticks, repeats)
                row += f" | {s * 1e6:>9.1f} {s * 1e6 / ports:>8.3f} {s / TIMING.frame * 100:>8.2f}%"
            print(row)

    print("\nWhole engine tick (read, floor, mix, PTT, write, meters), 10 % of ports talking")
    print(f"{'ports':>6} {'groups':>6} {'µs/tick':>10} {'µs/port':>9} {'% of 20 ms':>10}")
    for ports in (10, 100, 1000, 2000):
        for groups in (1, 10, 100):
            if groups > ports:
                continue
            s = bench_tick(ports, groups, 0.1, ticks, repeats)
            print(
                f"{ports:>6} {groups:>6} {s * 1e6:>10.1f} {s * 1e6 / ports:>9.3f} "
                f"{s / TIMING.frame * 100:>9.2f}%"
            )

    print("\nWhole tick, one conference with every port talking (N-1 for each, limiter on)")
    print(f"{'ports':>6} {'read/write':>11} {'µs/tick':>10} {'µs/port':>9} {'% of 20 ms':>10}")
    for ports in (250, 750):
        for banked in (False, True):
            s = bench_conference(ports, banked, ticks, repeats)
            how = "bank" if banked else "per port"
            print(
                f"{ports:>6} {how:>11} {s * 1e6:>10.1f} {s * 1e6 / ports:>9.3f} "
                f"{s / TIMING.frame * 100:>9.2f}%"
            )

    print(f"\nMedia clock lateness over {args.clock_ticks} ticks of 20 ms (idle engine)")
    print(f"{'loop':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'late':>5} {'last tick ms':>13}")
    for name, use_uvloop in (("asyncio", False), ("uvloop", True)):
        r = bench_clock(args.clock_ticks, use_uvloop)
        print(
            f"{name:>8} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['max']:>8.3f} {r['late']:>5} "
            f"{r['last']:>13.3f}"
        )


if __name__ == "__main__":
    main()
