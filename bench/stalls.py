"""The machine's own stalls beside a bench run: how late a realtime thread wakes.

    .venv/bin/python bench/stalls.py --seconds 60     # the machine alone, a table

A gateway's FIFO underruns when a card's callback or the engine's tick comes later than
its margin covers. On a shared VM the hypervisor takes the CPU away now and then (steal),
and then every thread on it is late, the audio server's and the gateway's alike. A bench
that counts underruns without counting those stalls cannot say whose they are, so the
radio bench runs ``cyclictest`` (rt-tests, the tool Linux audio and RT people use for
this) beside its drift run: one thread per CPU at SCHED_FIFO 95, above the audio server
and the gateway, waking every millisecond. How late it wakes is the machine's doing, not
ours: nothing of ours can hold it off its CPU. Each wake-up later than ``--spike`` is kept
with its time (CLOCK_MONOTONIC, as ``time.monotonic()``), so an underrun can be matched to
a stall just before it. The hypervisor's steal time (``/proc/stat``) is read as well.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SPIKE_RE = re.compile(r"T:\s*(\d+)\s+Spike:\s*(\d+):\s*TS:\s*(\d+)")
# An underrun is matched to a stall that ended this long before it, or just after (the
# tick that notices a FIFO dry comes up to a frame after the callback that ran it dry,
# and the probe's wake-up may be noted a little after our thread's).
BEFORE_S = 0.1
AFTER_S = 0.02
USER_HZ = 100  # /proc/stat's unit


def steal_seconds() -> float:
    """Time the hypervisor ran something else while this VM's CPUs wanted to run."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / USER_HZ if len(fields) > 8 else 0.0


@dataclass
class Stalls:
    """cyclictest running beside a bench for ``seconds``; ``stop()`` reads its results."""

    seconds: float
    spike_us: int = 2000
    spikes: list[tuple[float, float]] = field(default_factory=list)  # (woke at, late by) s
    worst: float = float("nan")
    wakeups: int = 0
    steal: float = 0.0
    started: float = 0.0
    ran: float = 0.0

    def start(self) -> Stalls:
        exe = shutil.which("cyclictest")
        if exe is None:
            raise RuntimeError("cyclictest not found: apt-get install rt-tests")
        self._json = Path(tempfile.mkstemp(suffix=".json")[1])
        self._steal0 = steal_seconds()
        self.started = time.monotonic()
        self._proc = subprocess.Popen(
            [
                exe,
                "-m",
                "-p",
                "95",
                "-i",
                "1000",
                "-a",
                "-t",
                "-q",
                "-D",
                f"{int(self.seconds) + 1}",
                f"--spike={self.spike_us}",
                "--spike-nodes=1000000",
                f"--json={self._json}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return self

    def stop(self) -> Stalls:
        """Stop the probe (if it still runs) and read what it saw."""
        self._proc.terminate()
        out, err = self._proc.communicate(timeout=30)
        self.ran = time.monotonic() - self.started
        self.steal = steal_seconds() - self._steal0
        self.spikes = sorted((int(ts) / 1e6, int(us) / 1e6) for _, us, ts in SPIKE_RE.findall(out))
        try:
            threads = json.loads(self._json.read_text())["thread"].values()
            self.worst = max(t["max"] for t in threads) / 1e6
            self.wakeups = sum(t["cycles"] for t in threads)
        except (OSError, ValueError, KeyError) as exc:
            raise RuntimeError(f"cyclictest gave no results ({exc}): {err.strip()[-300:]}") from exc
        finally:
            self._json.unlink(missing_ok=True)
        return self

    def late(self, least: float) -> list[tuple[float, float]]:
        return [s for s in self.spikes if s[1] >= least]

    def explains(self, when: float, least: float) -> bool:
        """Did a realtime wake-up come ``least`` seconds late or more just before ``when``?"""
        return any(when - BEFORE_S <= t <= when + AFTER_S for t, _ in self.late(least))

    def worst_near(self, when: float) -> float:
        """The latest realtime wake-up in the window just before ``when`` (0 if none)."""
        return max(
            (late for t, late in self.spikes if when - BEFORE_S <= t <= when + AFTER_S), default=0.0
        )

    def cover(self, least: float) -> float:
        """The share of the run within a stall's window: the chance an underrun with no
        cause in the machine would fall in one anyway."""
        covered, end = 0.0, -1e18
        for t, _ in self.late(least):
            lo, hi = max(t - AFTER_S, end), t + BEFORE_S
            covered += max(0.0, hi - lo)
            end = max(end, hi)
        return covered / self.ran if self.ran else float("nan")


def table(stalls: Stalls, thresholds_ms: tuple[float, ...] = (2, 5, 10, 20)) -> str:
    lines = [
        f"realtime wake-ups (cyclictest, 1 ms, SCHED_FIFO 95, each CPU): {stalls.wakeups}, "
        f"the latest {stalls.worst * 1000:.1f} ms late; hypervisor steal "
        f"{stalls.steal:.2f} s in {stalls.ran:.0f} s",
        f"{'late by ≥':>10} {'wake-ups':>9} {'per minute':>10}",
    ]
    for ms in thresholds_ms:
        if ms * 1000 >= stalls.spike_us:
            n = len(stalls.late(ms / 1000))
            lines.append(f"{ms:>7.0f} ms {n:>9} {n / stalls.ran * 60:>10.1f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--spike", type=int, default=2000, help="keep wake-ups this late (µs)")
    args = parser.parse_args()
    stalls = Stalls(args.seconds, args.spike).start()
    time.sleep(args.seconds)
    print(table(stalls.stop()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
