"""One floor on both sides of a link: how long a collision takes to settle.

    .venv/bin/python bench/link_floor.py              # 20 collisions
    .venv/bin/python bench/link_floor.py --count 50

Two real gateways (CA and US) in this process, linked over TLS and SRTP on
loopback, share a ``single`` talkgroup. Each round keys a radio on both sides in
the same turn of the event loop (both engines tick on it), then records, from the
engines' own floor events, when each side last changed its holder. Convergence is
the later side's last change after the key-up; the goal (issue #15) is one round
trip plus one frame (loopback: a round trip is well under a millisecond, so one
or two 20 ms ticks). Also counted: rounds where both sides did not end on the same
holder (must be 0) and which side won (by the rule: the earlier key-up, else the
lower site ID).

The machine is shared: figures are medians and p90 over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "links"), str(ROOT)]

from trunk_sites import LinkSpec, SiteSpec, make_pki, radio, running, share_state, site_toml  # noqa: E402

import gateway.site  # noqa: E402,F401  (every section: [audit], [sip], [links]...)
from tests.sip.sip_peers import until  # noqa: E402


def holder(gateway) -> str | None:  # noqa: ANN001
    held = [f.holder for f in gateway.engine.shared_floors.floors.values() if f.holder]
    return held[0].site if held else None


async def rounds(folder: Path, count: int) -> None:
    pki = make_pki(folder, ("ca", "us"))
    ca = SiteSpec("ca", {"marine": 1000.0}, [LinkSpec("us", "us", {"marine": "shiprider"})],
                  floor="single")  # fmt: skip
    us = SiteSpec("us", {"harbor": 1500.0}, [LinkSpec("ca", "ca", {"harbor": "shiprider"})],
                  floor="single")  # fmt: skip
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    paths = site_toml(folder, ca, ports, pki), site_toml(folder, us, ports, pki)
    async with running(paths[0]) as a, running(paths[1]) as b:
        await until(lambda: share_state(a, "us", "shiprider") == "up"
                    and share_state(b, "ca", "shiprider") == "up", 20, "the link up")  # fmt: skip
        changes: dict[str, list[float]] = {"ca": [], "us": []}
        for site, gateway in (("ca", a), ("us", b)):
            gateway.engine.listeners.append(
                lambda e, s=site: changes[s].append(time.monotonic())
                if e.kind in ("floor_granted", "preempted") else None
            )  # fmt: skip
        settle, disagree, wins = [], 0, {"ca": 0, "us": 0}
        for _ in range(count):
            for side in changes.values():
                side.clear()
            keyed = time.monotonic()
            radio(a, "marine").speaking = radio(b, "harbor").speaking = True
            await asyncio.sleep(1.0)  # a bench: let the collision play out, then read
            if holder(a) != holder(b) or holder(a) is None:
                disagree += 1
            else:
                wins[holder(a)] += 1
            last = max((t for side in changes.values() for t in side), default=keyed)
            settle.append((last - keyed) * 1000)
            radio(a, "marine").speaking = radio(b, "harbor").speaking = False
            await until(lambda: holder(a) is None and holder(b) is None, 5, "the floor free")
            await asyncio.sleep(0.3)
    settle.sort()
    p90 = settle[min(len(settle) - 1, int(0.9 * len(settle)))]
    print(f"collisions: {count}   sides disagreed at the end: {disagree}   won: {wins}")
    print("| settled after key-up (ms) | median | p90 | max |")
    print("|---|---|---|---|")
    print(f"| both sides, last holder change | {statistics.median(settle):.1f} | {p90:.1f} "
          f"| {settle[-1]:.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(rounds(Path(folder), args.count))


if __name__ == "__main__":
    main()
