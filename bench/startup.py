"""How long ``borderlink --version``, ``--help`` and ``check`` take; what --version imports.

    .venv/bin/python bench/startup.py                  # this tree, idle machine
    .venv/bin/python bench/startup.py --stress         # with `stress-ng --cpu 2` beside it
    .venv/bin/python bench/startup.py --tree /work/main        # another tree (its .venv)

Each row is the median of 5 runs: wall time, and CPU time (user + system) of the
process, which a busy machine inflates less than wall time. ``python -c pass`` is
the floor every command pays (interpreter and site start-up). The goal (issue #18)
is ``--version`` at most 0.2 s on an idle machine.

Measured 6 Dec 2026 on the shared 2-core machine (load average 4-8 from other
work), median of 5, wall / CPU seconds:

    --version                 registries (main c132653)   composition root
    as it was                 1.03 / 0.94                 0.07-0.21 / 0.07-0.12
    stress-ng --cpu 2 beside  5.31 / 1.15                 0.32 / 0.08
    check (example site)      1.54 / 1.10                 0.82 / 0.49
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = 5
HEAVY = ("numpy", "scipy", "aiortc", "av", "sounddevice", "cryptography", "pydantic", "aiohttp")
LOADED = f"""
import runpy, sys
sys.argv = ["borderlink", "--version"]
try:
    runpy.run_module("gateway.cli", run_name="__main__")
except SystemExit:
    pass
print("heavy:", *sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))
"""


def timed(command: list[str], tree: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        command, cwd=tree, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def row(name: str, command: list[str], tree: Path) -> str:
    runs = [timed(command, tree) for _ in range(RUNS)]
    wall = statistics.median(w for w, _ in runs)
    cpu = statistics.median(c for _, c in runs)
    spread = f"{min(w for w, _ in runs):.3f}–{max(w for w, _ in runs):.3f}"
    return f"{name:<28} {wall:8.3f} {cpu:8.3f}   {spread}"


@contextlib.contextmanager
def stress(on: bool):
    """``stress-ng --cpu 2`` for the duration of the block (it stops itself after 5 min)."""
    if not on:
        yield
        return
    if shutil.which("stress-ng") is None:
        sys.exit("stress-ng is not installed")
    load = subprocess.Popen(["stress-ng", "--cpu", "2", "--timeout", "300s", "--quiet"])
    try:
        time.sleep(2.0)  # let it reach full load
        yield
    finally:
        load.terminate()
        load.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tree",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="the work tree to time (run with its .venv)",
    )
    parser.add_argument("--stress", action="store_true", help="run stress-ng --cpu 2 beside")
    args = parser.parse_args()
    tree = args.tree.resolve()
    py = str(tree / ".venv" / "bin" / "python")
    with stress(args.stress):
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{tree}, {'with stress-ng --cpu 2, ' if args.stress else ''}load average {load}")
        print(f"{'median of ' + str(RUNS):<28} {'wall s':>8} {'CPU s':>8}   wall min–max")
        print(row("python -c pass", [py, "-c", "pass"], tree))
        print(row("borderlink --version", [py, "-m", "gateway.cli", "--version"], tree))
        print(row("borderlink --help", [py, "-m", "gateway.cli", "--help"], tree))
        check = [py, "-m", "gateway.cli", "check", "--no-hardware", "config/example-site.toml"]
        print(row("borderlink check (example)", check, tree))
    loaded = subprocess.run([py, "-c", LOADED], cwd=tree, capture_output=True, text=True)
    heavy = loaded.stdout.split("heavy:")[-1].split()
    print(f"--version imports, of {', '.join(HEAVY)}: {', '.join(heavy) or 'none'}")


if __name__ == "__main__":
    main()
