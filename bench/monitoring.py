"""What monitoring costs: per tick (histogram hook + event counting) and per scrape.

    .venv/bin/python bench/monitoring.py            # the table (about half a minute)
    .venv/bin/python bench/monitoring.py --quick    # fewer repeats

A scrape is split as the exporter runs it: the snapshot (on the loop thread, so
it delays the media clock) and the rendering to text (in a worker thread).
Figures are medians of repeated runs; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

from gateway.monitoring.metrics import SiteMetrics

import gateway.site  # noqa: F401  (registers port kinds and sections)
from gateway.app import Gateway
from gateway.config import parse_config
from gateway.engine import Event


def site(ports: int) -> str:
    """Half the ports talk a tone on a schedule (so events happen), half listen."""
    lines = ['[site]\nname = "bench"\ncountry = "CA"\n']
    per_group = 10
    groups: dict[int, list[str]] = {}
    for i in range(ports):
        talker = i % 2 == 0
        lines.append(f'[ports.p{i}]\nkind = "simulated_radio"\n')
        if talker:
            lines.append(f'talk_every = "2s"\ntalk_for = "1s"\ntalk_offset = "{(i % 7) * 100}ms"\n')
        else:
            lines.append('talk_offset = "1h"\n')
        groups.setdefault(i // per_group, []).append(f'"p{i}"')
    for g, members in groups.items():
        lines.append(f"[talkgroups.tg{g}]\nmembers = [{', '.join(members)}]\n")
    return "\n".join(lines)


def per_tick_us(gw: Gateway, ticks: int) -> float:
    tick = gw.clock.on_tick
    start = time.perf_counter()
    for _ in range(ticks):
        tick()
    return (time.perf_counter() - start) / ticks * 1e6


def hook_costs(repeats: int) -> tuple[float, float]:
    """µs the tick hook adds per tick, and µs one engine event costs the counters.

    Measured in isolation (the hook around a no-op tick), because a whole tick on a
    shared machine varies by more than the hook costs.
    """
    gw = Gateway(parse_config(site(10)))
    gw.engine.tick = lambda: None  # type: ignore[method-assign]
    gw.clock.on_tick = gw.engine.tick
    bare = gw.clock.on_tick
    metrics = SiteMetrics.of(gw)
    hooked = gw.clock.on_tick
    n = 200_000
    costs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            bare()
        t1 = time.perf_counter()
        for _ in range(n):
            hooked()
        t2 = time.perf_counter()
        costs.append(((t2 - t1) - (t1 - t0)) / n * 1e6)
    event = Event("ptt_off", "p1", "tg0", seconds=1.0)
    per_event = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n // 10):
            metrics.on_event(event)
        per_event.append((time.perf_counter() - t0) / (n // 10) * 1e6)
    return statistics.median(costs), statistics.median(per_event)


def measure(ports: int, repeats: int, ticks: int) -> dict[str, float]:
    watched = Gateway(parse_config(site(ports)))
    metrics = SiteMetrics.of(watched)  # hooks the clock and listens to events
    base = [per_tick_us(watched, ticks) for _ in range(repeats)]
    snap_ms, render_ms, size = [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        snapshot = metrics.snapshot()
        t1 = time.perf_counter()
        text = metrics.render(snapshot)
        t2 = time.perf_counter()
        snap_ms.append((t1 - t0) * 1e3)
        render_ms.append((t2 - t1) * 1e3)
        size = len(text)
    return {
        "ports": ports,
        "tick_us": statistics.median(base),
        "snapshot_ms": statistics.median(snap_ms),
        "render_ms": statistics.median(render_ms),
        "kib": size / 1024,
        "events": sum(metrics.events.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats, ticks = (3, 100) if args.quick else (7, 250)
    hook_us, event_us = hook_costs(repeats)
    print("Monitoring cost (medians of repeated runs; a tick carries 20 ms of audio)")
    print(f"  per tick: tick-duration histogram hook {hook_us:.2f} µs")
    print(f"  per engine event (PTT, talk, floor…): counters {event_us:.2f} µs")
    print()
    print(f"{'ports':>6} {'tick µs':>9} {'snapshot ms':>12} {'render ms':>10} "
          f"{'scrape/port µs':>15} {'snapshot/tick':>14} {'text KiB':>9}")  # fmt: skip
    for ports in (10, 100, 1000):
        r = measure(ports, repeats, ticks)
        per_port = (r["snapshot_ms"] + r["render_ms"]) * 1e3 / ports
        ratio = r["snapshot_ms"] * 1e3 / r["tick_us"]
        print(f"{ports:>6} {r['tick_us']:>9.0f} {r['snapshot_ms']:>12.2f} {r['render_ms']:>10.2f} "
              f"{per_port:>15.1f} {ratio:>13.1f}x {r['kib']:>9.0f}")  # fmt: skip
    print("snapshot runs on the loop thread (it delays that tick); render runs in a worker")
    print("thread. tick µs is a whole engine tick of that site, for scale.")


if __name__ == "__main__":
    main()
