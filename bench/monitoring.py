"""What monitoring costs: per tick (histogram hook + event counting) and per scrape.

    .venv/bin/python bench/monitoring.py            # the table (about half a minute)
    .venv/bin/python bench/monitoring.py --quick    # fewer repeats
    .venv/bin/python bench/monitoring.py --stall    # how late ticks run while scraped

``--stall`` runs a live gateway (media clock, web server) with 1000 and 1250
network-leg-like ports and reads ``/metrics`` over HTTP every half second; it prints
how late the ticks ran during the scrapes, beside the same gateway not scraped. The
legs are either ports with series of their own (as console positions are: each with a
SIP leg's 16 ``stats()`` counters) or per-call ports (as SIP calls are: counted per
route, their ``stats()`` not read).

A scrape's work is shown in two parts, the snapshot (copying the engine's state) and
the rendering to text; the exporter runs both on the loop thread between ticks, in
slices, so neither delays a tick (``--stall`` shows it on a live gateway).
Figures are medians of repeated runs; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np
from gateway.monitoring.metrics import SiteMetrics

from gateway.app import Gateway
from gateway.config import PortConfig, parse_config
from gateway.engine import Event
from gateway.ports import Port


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


class LegLike(Port):
    """A network leg as metrics see it: silent, with a SIP leg's counters in stats();
    ``per_call``: counted per route (as SIP calls are), else a series of its own."""

    kind = "sip"

    def __init__(
        self, name: str, gw: Gateway, row: int, counters: np.ndarray, per_call: bool = False
    ) -> None:
        super().__init__(name, PortConfig(kind="sip"), gw.config.timing)
        self.row, self.counters = row, counters
        self.per_call, self.route = per_call, f"{6000 + row % 4}"

    def stats(self) -> dict[str, float]:  # as costly as gateway.sip.bank's: numpy scalars
        c, r = self.counters, self.row
        keys = (
            "packets_in",
            "packets_out",
            "bytes_in",
            "bytes_out",
            "packets_lost",
            "packets_late",
            "packets_malformed",
            "concealed_samples",
            "rtcp_reports_in",
            "rtcp_reports_out",
            "remote_packets_lost",
        )
        stats = {k: int(c[i, r]) for i, k in enumerate(keys)}
        stats.update(
            jitter_seconds=float(c[0, r]) / 8000,
            jitter_buffer_seconds=0.04,
            remote_jitter_seconds=float(c[1, r]) / 8000,
            rtt_seconds=0.01,
        )
        return stats


async def stall_run(
    legs: int, seconds: float, scrape_every: float | None, per_call: bool = False
) -> dict[str, float]:
    """Tick lateness of a live gateway with ``legs`` call-like ports, scraped or not."""
    import aiohttp

    text = site(20) + '\n[web]\nhost = "127.0.0.1"\nport = 0\n'
    gw = Gateway(parse_config(text))
    counters = np.arange(11 * legs, dtype=np.int64).reshape(11, legs)
    for i in range(legs):
        gw.engine.attach(LegLike(f"call-{i}", gw, i, counters, per_call), f"tg{i % 2}")
    task = asyncio.create_task(gw.run())
    while gw.web is None or gw.web.port is None or gw.clock.ticks < 50:
        await asyncio.sleep(0.05)
    first, late_before = gw.clock.ticks, gw.clock.late_ticks
    worst, scrapes, scrape_s, longest, frames = 0.0, 0, [], 0.0, []
    url = f"http://127.0.0.1:{gw.web.port}/metrics"
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < end:
            if scrape_every:
                t0 = time.monotonic()
                async with session.get(url) as response:
                    await response.read()
                scrape_s.append(time.monotonic() - t0)
                metrics = gw.metrics  # type: ignore[attr-defined]
                longest = max(longest, getattr(metrics, "longest_slice", 0.0))
                frames.append(len(getattr(metrics, "slice_ticks", [])))
                scrapes += 1
            await asyncio.sleep(scrape_every or 0.5)
            recent = gw.clock.lateness.recent()
            worst = max(worst, float(recent.max()) if recent.size else 0.0)
    ticks = gw.clock.ticks - first
    recent = gw.clock.lateness.recent()[-ticks:]
    late = gw.clock.late_ticks - late_before
    gw.stop()
    await task
    return {
        "legs": legs,
        "scrapes": scrapes,
        "ticks": ticks,
        "late": late,
        "p99_ms": float(np.percentile(recent, 99)) * 1e3,
        "max_ms": worst * 1e3,
        "scrape_ms": statistics.median(scrape_s) * 1e3 if scrape_s else 0.0,
        "slice_ms": longest * 1e3,
        "slices": statistics.median(frames) if frames else 0,
    }


def stall_table(seconds: float) -> None:
    print("Tick lateness while /metrics is read over HTTP every 0.5 s (live gateway, 20 ms ticks)")
    print(
        f"{'legs':>6} {'series':>9} {'scraped':>8} {'ticks':>6} {'late':>5} {'p99 ms':>7} "
        f"{'max ms':>7} {'scrape ms':>10} {'slices':>7} {'longest slice ms':>17}"
    )
    for per_call in (False, True):
        for legs in (1000, 1250):
            for every in (None, 0.5):
                r = asyncio.run(stall_run(legs, seconds, every, per_call))
                print(
                    f"{legs:>6} {'per route' if per_call else 'per leg':>9} "
                    f"{'yes' if every else 'no':>8} {r['ticks']:>6} {r['late']:>5} "
                    f"{r['p99_ms']:>7.2f} {r['max_ms']:>7.2f} {r['scrape_ms']:>10.1f} "
                    f"{r['slices']:>7.0f} {r['slice_ms']:>17.2f}"
                )
    print("series: per leg = a series set per leg (console positions); per route = legs")
    print("counted per route (SIP calls).")
    print("late: ticks that started more than a frame after their deadline; max: the worst")
    print("start lateness seen; scrape ms: one /metrics read, request to last byte (median);")
    print("slices: frames a page was built over; longest slice: CPU time of the longest stretch")
    print("of page work the loop ran without a break (a tick can wait that long, plus the")
    print("machine's own stalls, which the unscraped rows show).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stall", action="store_true", help="tick lateness while scraped")
    parser.add_argument("--seconds", type=float, default=10.0, help="per --stall run")
    args = parser.parse_args()
    if args.stall:
        stall_table(args.seconds)
        return
    repeats, ticks = (3, 100) if args.quick else (7, 250)
    hook_us, event_us = hook_costs(repeats)
    print("Monitoring cost (medians of repeated runs; a tick carries 20 ms of audio)")
    print(f"  per tick: tick-duration histogram hook {hook_us:.2f} µs")
    print(f"  per engine event (PTT, talk, floor…): counters {event_us:.2f} µs")
    print()
    print(
        f"{'ports':>6} {'tick µs':>9} {'snapshot ms':>12} {'render ms':>10} "
        f"{'scrape/port µs':>15} {'snapshot/tick':>14} {'text KiB':>9}"
    )
    for ports in (10, 100, 1000):
        r = measure(ports, repeats, ticks)
        per_port = (r["snapshot_ms"] + r["render_ms"]) * 1e3 / ports
        ratio = r["snapshot_ms"] * 1e3 / r["tick_us"]
        print(
            f"{ports:>6} {r['tick_us']:>9.0f} {r['snapshot_ms']:>12.2f} {r['render_ms']:>10.2f} "
            f"{per_port:>15.1f} {ratio:>13.1f}x {r['kib']:>9.0f}"
        )
    print("The exporter does both on the loop thread between ticks, in slices of at most a")
    print("quarter frame (see --stall). tick µs is a whole engine tick of that site, for scale.")


if __name__ == "__main__":
    main()
