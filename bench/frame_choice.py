"""What a 10 ms engine frame costs against 20 ms: the demo, a 4-radio JACK site, 500 SIP callers.

    .venv/bin/python bench/frame_choice.py                  # 3 rounds, about 15 minutes
    .venv/bin/python bench/frame_choice.py --rounds 5 --cases jack sip
    .venv/bin/python bench/frame_choice.py --server mine    # the JACK site on jackd -n mine

Issue #18 asks that the default frame be chosen from these figures. Each round runs every
case once at 20 ms and once at 10 ms, in alternating order (this VM's speed wanders by a
quarter within minutes, so only runs side by side compare), and the table gives each
case's median over the rounds, in % of one core, with the ratio 10 ms ÷ 20 ms:

* demo: ``borderlink demo --plain`` (two gateways linked over TLS, simulated radios
  talking by the script), every process of it, ``--idle`` seconds after ``--settle``;
* jack: ``--radios`` sound-card radios on a JACK dummy server (48 kHz, period 256), idle,
  the gateway and its card processes (``bench/footprint.py``);
* sip: ``--legs`` G.711 callers (20 ms packets) all talking into one conference
  talkgroup, the gateway process (``bench/sip_load.py``'s load run, plain RTP).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import footprint  # noqa: E402
import sip_load  # noqa: E402

from gateway.units import parse_duration  # noqa: E402

FRAMES = ("20ms", "10ms")

# The demo with its two site files' [timing] frame (20 ms) rewritten: the same scenario, the
# demo's clock (ticks × FRAME) kept right.
DEMO = """\
import sys
from pathlib import Path
import gateway.demo.sites as sites
sites.TEMPLATES, sites.FRAME = Path(sys.argv[1]), float(sys.argv[2])
from gateway.cli import main
sys.exit(main(["demo", "--plain"]))
"""


def demo_cpu(frame: str, idle: float, settle: float) -> float:
    """Every demo process's CPU over ``idle`` seconds, % of one core."""
    with tempfile.TemporaryDirectory(prefix="frame-demo") as folder:
        for site in ("ca", "us"):
            text = (ROOT / "config" / "demo" / f"{site}.toml").read_text(encoding="utf-8")
            text = text.replace('frame = "20ms"', f'frame = "{frame}"')
            (Path(folder) / f"{site}.toml").write_text(text, encoding="utf-8")
        seconds = parse_duration(frame)
        demo = subprocess.Popen(
            [sys.executable, "-c", DEMO, folder, str(seconds)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(settle)
            if demo.poll() is not None:
                raise RuntimeError(f"the demo at {frame} stopped by itself")
            return sum(cpu for _, cpu in footprint.measure(demo, idle))
        finally:
            footprint.stop(demo)


def jack_cpu(frame: str, radios: int, idle: float, settle: float, server: str) -> float:
    with tempfile.TemporaryDirectory(prefix="frame-jack") as tmp:
        rows = footprint.jack_site(radios, idle, settle, Path(tmp), frame, server)
    return sum(cpu for _, cpu in rows)


def sip_cpu(frame: str, legs: int, seconds: float) -> float:
    row = sip_load.load_run(mp.get_context("spawn"), legs, seconds, frame=frame)
    return row["cpu_share"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="*", choices=["demo", "jack", "sip"], default=None)
    parser.add_argument("--idle", type=float, default=20.0, help="demo and JACK CPU window, s")
    parser.add_argument("--settle", type=float, default=15.0, help="wait before measuring, s")
    parser.add_argument("--radios", type=int, default=4)
    parser.add_argument("--legs", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0, help="SIP load window, s")
    parser.add_argument("--server", default=f"frames{os.getpid()}", help="jackd -n NAME")
    args = parser.parse_args()
    cases = {
        "demo": lambda f: demo_cpu(f, args.idle, args.settle),
        "jack": lambda f: jack_cpu(f, args.radios, args.idle, args.settle, args.server),
        "sip": lambda f: sip_cpu(f, args.legs, args.seconds),
    }
    names = {
        "demo": "demo (two linked gateways)",
        "jack": f"{args.radios}-radio JACK site, idle",
        "sip": f"{args.legs} SIP callers talking",
    }
    chosen = args.cases or list(cases)
    figures: dict[tuple[str, str], list[float]] = {}
    loads = []
    for r in range(args.rounds):
        order = FRAMES if r % 2 == 0 else FRAMES[::-1]
        for case in chosen:
            for frame in order:
                loads.append(os.getloadavg()[0])
                cpu = cases[case](frame)
                figures.setdefault((case, frame), []).append(cpu)
                print(f"  round {r + 1} {case:<5} {frame}: {cpu:6.2f} % (load {loads[-1]:.1f})")
    print(
        f"\nCPU, % of one core, median of {args.rounds} alternating rounds "
        f"(load average {min(loads):.1f}–{max(loads):.1f}, {os.cpu_count()} cores)"
    )
    print(f"  {'case':<30}{'20 ms':>8}{'10 ms':>8}{'10 ÷ 20':>9}   runs at 10 ms")
    for case in chosen:
        a, b = (statistics.median(figures[(case, f)]) for f in FRAMES)
        runs = " ".join(f"{v:.1f}" for v in figures[(case, "10ms")])
        print(f"  {names[case]:<30}{a:>8.2f}{b:>8.2f}{b / a:>9.2f}   {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
