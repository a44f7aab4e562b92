"""Mouth-to-ear through a relay: a chain A–B–C whose middle relays, A talking.

    .venv/bin/python bench/link_chain.py               # G.711, 40 looks
    .venv/bin/python bench/link_chain.py --codec opus --count 80

Three real gateways in this process, linked A–B and B–C over TLS and SRTP on
loopback, B with ``[links] relay``. A's radio talks its tone over a seeded noise
signature (``tests/links/trunk_sites.py``); every half second the bench takes what
B's and C's listening radios heard (0.6 s) and what A's radio sent (3 s), finds the
copy by cross-correlation and turns its lag into a delay with the wall time of each
radio's last frame (a look counts when the copy is found whole, within 3 dB of the
talker's level for G.711; how many did is printed). A→B is one hop (the figure of
``bench/links.py`` at 0 ms), A→C two: B's jitter buffer and its tick add to it.
Printed: p50 / p99 of each, and the level of the copy (0 dB: the talker's level).

With ``--codec opus`` the waveform is not kept (Opus keeps how it sounds), so the
correlation is weaker; G.711 is the default. The machine is shared: medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "links"), str(ROOT)]

import trunk_sites  # noqa: E402
from test_chain_relay import copy_gains  # noqa: E402
from test_mesh_floor import TONES  # noqa: E402
from trunk_sites import RATE, LinkSpec, SiteSpec, make_pki, running, site_toml  # noqa: E402

from gateway.site import run_async  # noqa: E402
from tests.waiting import until  # noqa: E402

LINKS = {"a": ["b"], "b": ["a", "c"], "c": ["b"]}
# A look counts when the copy is found whole (a frame skipped inside the 0.6 s window
# splits it into two weaker peaks, and its lag is then half right). Opus keeps how the
# noise sounds, not its waveform: its copy correlates some 8 dB lower.
FOUND_DB = {"pcmu": -3.0, "opus": -12.0}


def timestamped() -> None:
    """Each test radio remembers the monotonic time of its last frame, both ways."""
    radio = trunk_sites.LinkRadio
    read, write = radio.read, radio.write

    def read_at(self, *a):  # noqa: ANN001, ANN202
        frame = read(self, *a)
        self.sent_at = time.monotonic()
        return frame

    def write_at(self, *a):  # noqa: ANN001, ANN202
        write(self, *a)
        self.heard_at = time.monotonic()

    radio.read, radio.write = read_at, write_at


def lag(heard: np.ndarray, sent: np.ndarray) -> tuple[int, float]:
    """(lag in samples, level in dB) of the strongest copy of ``sent`` in ``heard``."""
    gain = copy_gains(heard, sent)
    if gain is None:
        return 0, -99.0
    k = int(np.argmax(gain))
    return k, float(20 * np.log10(max(gain[k], 1e-5)))


async def measure(folder: Path, codec: str, count: int) -> None:
    pki = make_pki(folder, tuple(TONES))
    specs = {
        s: SiteSpec(
            s,
            {"net": hz},
            [LinkSpec(p, p, {"net": "net"}) for p in LINKS[s]],
            listeners=("net",),
            relay=("net",) if s == "b" else (),
            codecs=(codec, "pcmu") if codec != "pcmu" else ("pcmu",),
            signature=1 if s == "a" else 0,
        )
        for s, hz in TONES.items()
    }
    ports = {s: spec.tls_port for s, spec in specs.items()}
    paths = {s: site_toml(folder, spec, ports, pki) for s, spec in specs.items()}
    async with running(paths["a"]) as a, running(paths["b"]) as b, running(paths["c"]) as c:
        gws = {"a": a, "b": b, "c": c}

        def up() -> bool:
            return (
                all(
                    all(
                        st.state == "up" for t in g.links.trunks.values() for st in t.names.values()
                    )
                    for g in gws.values()
                )
                and b.engine.shared_floors.relaying.get("net") == ""
            )

        await until(up, 60, "the chain up and B relaying")
        talker = a.ports["net-radio"]
        talker.speaking = True
        await asyncio.sleep(3.5)
        delays: dict[str, list[float]] = {"b": [], "c": []}
        levels: dict[str, list[float]] = {"b": [], "c": []}
        for _ in range(count):
            await asyncio.sleep(0.5)
            for site in ("b", "c"):
                ear = gws[site].ports["net-ear"]
                heard, heard_at = ear.recent(0.6), ear.heard_at
                sent, sent_at = talker.recent(3.0, sent=True), talker.sent_at
                k, db = lag(heard, sent)
                delay = heard_at - sent_at + (len(sent) - len(heard) - k) / RATE
                levels[site].append(db)
                if db > FOUND_DB[codec]:  # else the window caught a skipped or repeated frame
                    delays[site].append(delay * 1000)
        talker.speaking = False
    print(f"codec {codec}, {count} looks, load average {os.getloadavg()[0]:.1f}")
    print("path            looks   p50 ms   p99 ms   level dB (median)")
    for site, name in (("b", "A→B (1 hop)"), ("c", "A→C (relay)")):
        d = sorted(delays[site]) or [float("nan")]
        p99 = d[min(len(d) - 1, int(0.99 * len(d)))]
        print(
            f"{name:<15} {len(delays[site]):5d}   {statistics.median(d):6.1f}   {p99:6.1f}   "
            f"{statistics.median(levels[site]):6.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codec", choices=("pcmu", "opus"), default="pcmu")
    parser.add_argument("--count", type=int, default=40)
    args = parser.parse_args()
    timestamped()
    with tempfile.TemporaryDirectory() as tmp:
        run_async(measure(Path(tmp), args.codec, args.count))


if __name__ == "__main__":
    main()
