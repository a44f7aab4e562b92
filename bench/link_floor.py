"""One floor on both sides of a link: how long a collision takes to settle.

    .venv/bin/python bench/link_floor.py              # 2 gateways, 20 collisions
    .venv/bin/python bench/link_floor.py --sites 3    # 3 gateways in a full mesh
    .venv/bin/python bench/link_floor.py --load       # with stress-ng --cpu 2 beside
    .venv/bin/python bench/link_floor.py --processes  # each gateway its own process
    .venv/bin/python bench/link_floor.py --count 50
    .venv/bin/python bench/link_floor.py --frame 10ms # every engine at 10 ms frames

Two (or three, each linked to the others) real gateways in this process, linked
over TLS and SRTP on loopback, share a ``single`` talkgroup. Each round keys a
radio on every side in the same turn of the event loop (all engines tick on it),
then records, from the engines' own floor events, when each side last changed its
holder. Convergence is the last side's last change after the key-up; the goal
(issue #15) is one round trip plus 20 ms (loopback: a round trip is well under a
millisecond, so one or two 20 ms ticks). Also counted: rounds where the sides did
not end on the same holder (must be 0) and which side won (by the rule: the
earlier key-up, else the lower site ID). ``--load`` runs ``stress-ng --cpu 2``
beside for the whole run (two busy cores more than the machine has spare): ticks
come late and in bursts, which is what the figure then shows.

With ``--processes`` each gateway runs in a process of its own
(``tests/links/site_process.py``: its own clock, as each country's gateway would),
keyed at one wall-clock instant; convergence is then the last floor event's wall
time after that instant. In one process the gateways share one thread, so under load
three engines' ticks queue behind each other and the figure shows that queue.

The machine is shared: figures are medians and p90 over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "links"), str(ROOT)]

from trunk_sites import (  # noqa: E402
    LinkSpec,
    SiteSpec,
    make_pki,
    radio,
    running,
    share_state,
    site_toml,
    with_frame,
)

from gateway.site import run_async  # noqa: E402
from tests.waiting import until  # noqa: E402

SITES = {"ca": ("marine", 1000.0), "us": ("harbor", 1500.0), "mx": ("costa", 2200.0)}


def holder(gateway) -> str | None:  # noqa: ANN001
    held = [f.holder for f in gateway.engine.shared_floors.floors.values() if f.holder]
    return held[0].site if held else None


def site_files(folder: Path, names: list[str], frame: str = "") -> dict[str, Path]:
    """Each site's TOML: its radio's talkgroup shared as "shiprider" with every other;
    ``frame`` sets every engine's ``[timing] frame`` ("": the default)."""
    pki = make_pki(folder, tuple(names))
    specs = {
        n: SiteSpec(
            n,
            {SITES[n][0]: SITES[n][1]},
            [LinkSpec(p, p, {SITES[n][0]: "shiprider"}) for p in names if p != n],
            floor="single",
        )
        for n in names
    }
    ports = {n: spec.tls_port for n, spec in specs.items()}
    paths = {n: site_toml(folder, spec, ports, pki) for n, spec in specs.items()}
    for path in paths.values():
        path.write_text(with_frame(path.read_text(), frame))
    return paths


def report(settle: list[float], disagree: int, wins: dict, sites: int, count: int) -> None:
    settle.sort()
    p90 = settle[min(len(settle) - 1, int(0.9 * len(settle)))]
    print(
        f"gateways: {sites}   collisions: {count}   sides disagreed at the end: {disagree}"
        f"   won: {wins}"
    )
    print("| settled after key-up (ms) | median | p90 | max |")
    print("|---|---|---|---|")
    print(
        f"| every side, last holder change | {statistics.median(settle):.1f} | {p90:.1f} "
        f"| {settle[-1]:.1f} |"
    )


async def rounds(folder: Path, count: int, sites: int, frame: str = "") -> None:
    names = list(SITES)[:sites]
    paths = site_files(folder, names, frame)
    async with contextlib.AsyncExitStack() as stack:
        gws = {n: await stack.enter_async_context(running(paths[n])) for n in names}

        def all_up() -> bool:
            return all(
                share_state(gws[n], p, "shiprider") == "up" for n in names for p in names if p != n
            )

        await until(all_up, 30, "the links up")
        changes: dict[str, list[float]] = {n: [] for n in names}
        for site, gateway in gws.items():
            gateway.engine.listeners.append(
                lambda e, s=site: (
                    changes[s].append(time.monotonic())
                    if e.kind in ("floor_granted", "preempted")
                    else None
                )
            )
        settle, disagree, wins = [], 0, dict.fromkeys(names, 0)

        def radios(on: bool) -> None:
            for n, gateway in gws.items():
                radio(gateway, SITES[n][0]).speaking = on

        for _ in range(count):
            for side in changes.values():
                side.clear()
            keyed = time.monotonic()
            radios(True)
            await asyncio.sleep(1.0)  # a bench: let the collision play out, then read
            held = {holder(g) for g in gws.values()}
            if len(held) != 1 or None in held:
                disagree += 1
            else:
                wins[held.pop()] += 1
            last = max((t for side in changes.values() for t in side), default=keyed)
            settle.append((last - keyed) * 1000)
            radios(False)
            await until(lambda: all(holder(g) is None for g in gws.values()), 5, "floor free")
            await asyncio.sleep(0.3)
    report(settle, disagree, wins, sites, count)


def holder_of(state: dict) -> tuple:
    """A site process's shared floor holder (site, talker, key-up, emergency); () none."""
    return tuple(next(iter(state["holders"].values()), None) or ())


async def process_rounds(folder: Path, count: int, sites: int, frame: str = "") -> None:
    """The same rounds with each gateway in its own process (``--processes``)."""
    from test_mesh_floor import SiteProcess

    names = list(SITES)[:sites]
    paths = site_files(folder, names, frame)
    procs = {n: SiteProcess(n, paths[n], folder / f"{n}.log") for n in names}

    async def states() -> dict[str, dict]:
        return {n: await p.ask(op="state") for n, p in procs.items()}

    async def key(on: bool, at: float = 0.0) -> None:
        for n, proc in procs.items():
            await proc.ask(op="key", port=f"{SITES[n][0]}-radio", on=on, at=at)

    try:
        for proc in procs.values():
            await proc.start()

        def up(state: dict) -> bool:
            shares = state["shares"].values()
            return len(shares) == sites - 1 and all(v.get("shiprider") == "up" for v in shares)

        deadline = time.monotonic() + 60
        while not all(up(s) for s in (await states()).values()):
            if time.monotonic() > deadline:
                raise SystemExit("the links did not come up")
            await asyncio.sleep(0.2)
        settle, disagree, wins = [], 0, dict.fromkeys(names, 0)
        for _ in range(count):
            seen = {n: len(s["events"]) for n, s in (await states()).items()}
            at = time.time() + 0.3
            await key(True, at)
            await asyncio.sleep(1.3)  # a bench: let the collision play out, then read
            now = await states()
            held = {holder_of(s) for s in now.values()}
            if len(held) != 1 or () in held:
                disagree += 1
            else:
                wins[held.pop()[0]] += 1
            times = [e["at"] for n, s in now.items() for e in s["events"][seen[n] :]]
            settle.append((max(times, default=at) - at) * 1000)
            await key(False)
            while any(holder_of(s) for s in (await states()).values()):
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)
    finally:
        for proc in procs.values():
            await proc.stop()
    report(settle, disagree, wins, sites, count)


@contextlib.contextmanager
def load(on: bool):  # noqa: ANN201
    """stress-ng --cpu 2 beside the bench, stopped with it (bounded by its own timeout)."""
    if not on:
        yield
        return
    stress = shutil.which("stress-ng")
    if stress is None:
        raise SystemExit("--load needs stress-ng (apt-get install stress-ng)")
    proc = subprocess.Popen([stress, "--cpu", "2", "--timeout", "900s", "--quiet"])
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--sites", type=int, choices=(2, 3), default=2)
    parser.add_argument("--load", action="store_true", help="stress-ng --cpu 2 beside")
    parser.add_argument("--processes", action="store_true", help="each gateway its own")
    parser.add_argument("--frame", default="", help='every engine\'s frame: "20ms" or "10ms"')
    args = parser.parse_args()
    work = process_rounds if args.processes else rounds
    with tempfile.TemporaryDirectory() as folder, load(args.load):
        run_async(work(Path(folder), args.count, args.sites, args.frame))


if __name__ == "__main__":
    main()
