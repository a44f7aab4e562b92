"""How fast the PTT guardian unkeys a radio whose gateway died or hung, and what it costs.

    .venv/bin/python bench/ptt_guardian.py                       # 50 kills, 10 stops, a table
    .venv/bin/python bench/ptt_guardian.py --kills 20 --stops 0 --lines 8

A stand-in gateway (a Python process that imports NumPy and holds ``--ballast-mb`` of
memory, so its teardown is not a toy's) keys ``--lines`` CM108 keyers through the guardian
and feeds them every 20 ms, as the media tick does. Each keyer writes its HID reports to a
pty standing in for /dev/hidrawN; the bench waits on the pty for the report that unkeys
line 0, so the figure is from the signal to the report on the "wire":

- SIGKILL: the kernel closes the gateway's end of the socket; the guardian unkeys at once;
- SIGSTOP: nothing closes; the guardian unkeys when the heartbeat is 250 ms late, then
  SIGCONT and the line keys again when the stand-in asks.

The guardian's resident memory and CPU are read from /proc while ``--lines`` lines are fed
for ``--steady`` seconds. Bounded: every wait has a timeout; everything started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import tty
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 20.0

CLIENT = """
import json, sys, time
import numpy as np
from gateway.hardware import ptt
ballast = np.ones(int(sys.argv[1]) * 131072)  # MB of float64, touched
controllers = [ptt.PttController(ptt.Cm108Keyer(path), f"radio{i}", tot=0)
               for i, path in enumerate(sys.argv[2:])]
for c in controllers:
    c.open()
    c.key(True)
print(json.dumps({"guardian": ptt.shared_guardian().pid}), flush=True)
next_tick = time.monotonic()
while True:
    for c in controllers:
        c.fed()
    next_tick += 0.02
    time.sleep(max(0.0, next_tick - time.monotonic()))
"""


class Fob:
    """A pty standing in for a CM108's hidraw node: reports written to it are read here."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.buf = b""

    def wait(self, keyed: bool, timeout: float = TIMEOUT_S) -> float:
        """Block until a report with PTT ``keyed`` arrives; return when (monotonic)."""
        deadline = time.monotonic() + timeout
        while True:
            while len(self.buf) >= 5:
                report, self.buf = self.buf[:5], self.buf[5:]
                if bool(report[2] & 0x04) == keyed:
                    return time.monotonic()
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise TimeoutError(f"no {'key' if keyed else 'unkey'} report in {timeout}s")
            self.buf += os.read(self.master, 4096)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


def start(fobs: list[Fob], ballast_mb: int) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", CLIENT, str(ballast_mb), *(f.path for f in fobs)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S)
    if not ready:
        proc.kill()
        raise TimeoutError("the stand-in gateway did not start")
    guardian = json.loads(proc.stdout.readline())["guardian"]
    for fob in fobs:
        fob.wait(keyed=True)
    return proc, guardian


def gone(pid: int, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return
        if state in "ZX":
            return
        time.sleep(0.005)
    raise TimeoutError(f"process {pid} is still running")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith(key + ":"):
            return int(text.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs of the gateway")
    parser.add_argument("--stops", type=int, default=10, help="SIGSTOPs of the gateway")
    parser.add_argument("--lines", type=int, default=4, help="PTT lines the gateway keys")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds to measure CPU")
    parser.add_argument("--ballast-mb", type=int, default=200, help="the gateway's memory")
    args = parser.parse_args()

    fobs = [Fob() for _ in range(max(1, args.lines))]
    kills: list[float] = []
    stops: list[float] = []
    rekeys: list[float] = []
    try:
        for _ in range(args.kills):
            proc, guardian = start(fobs, args.ballast_mb)
            sent = time.monotonic()
            proc.kill()
            kills.append(fobs[0].wait(keyed=False) - sent)
            proc.wait(TIMEOUT_S)
            gone(guardian)
        proc, guardian = start(fobs, args.ballast_mb)
        try:
            cpu0, t0 = cpu_seconds(guardian), time.monotonic()
            time.sleep(args.steady)
            cpu = (cpu_seconds(guardian) - cpu0) / (time.monotonic() - t0)
            rss, anon = status_kb(guardian, "VmRSS"), status_kb(guardian, "RssAnon")
            policy = os.sched_getscheduler(guardian)
            prio = os.sched_getparam(guardian).sched_priority
            for _ in range(args.stops):
                sent = time.monotonic()
                proc.send_signal(signal.SIGSTOP)
                stops.append(fobs[0].wait(keyed=False) - sent)
                sent = time.monotonic()
                proc.send_signal(signal.SIGCONT)
                rekeys.append(fobs[0].wait(keyed=True) - sent)
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(TIMEOUT_S)
            gone(guardian)
    finally:
        for fob in fobs:
            fob.close()

    name = {os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_OTHER: "SCHED_OTHER"}.get(policy, str(policy))
    print(
        f"\nPTT guardian, {args.lines} CM108 lines fed every 20 ms, stand-in gateway "
        f"holding {args.ballast_mb} MB; guardian at {name} {prio}"
    )
    print(f"{'event':<34} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    rows = [
        ("SIGKILL -> unkey report", kills),
        ("SIGSTOP -> unkey report", stops),
        ("SIGCONT -> key report again", rekeys),
    ]
    for label, values in rows:
        if values:
            print(
                f"{label:<34} {len(values):>4} {pct(values, 50) * 1000:>8.1f} "
                f"{pct(values, 99) * 1000:>8.1f} {max(values) * 1000:>8.1f}"
            )
    print(
        f"guardian resident memory: {rss / 1024:.1f} MB ({anon / 1024:.1f} MB its own, the "
        f"rest shared libraries: libpython, libc); "
        f"CPU {cpu * 100:.2f} % of one core"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
