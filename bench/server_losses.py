"""Which xruns lost time, and which underruns had no xrun near them: the audio server's
stream clock against the wall clock, while a gateway carries a tone A→B.

    .venv/bin/python bench/server_losses.py --seconds 120 --realtime

A card's C callback stamps each call with (first frame, CLOCK_MONOTONIC). Sampled every
5 ms, ``wall seconds × rate − frames`` is how far the stream is behind the wall clock: it
steps up by a period or more when the server skipped cycles (time lost: the card neither
recorded nor played), and moves for one sample when a callback was only late. Printed
beside it: the xruns the callback was told of, and card A's receive and card B's transmit
underruns, each with the nearest xrun. The gateway counts an underrun within 0.5 s of an
xrun as the server's loss (``XRUN_SHADOW_S``); this shows how many xruns lost nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from radio_latency import RADIO, go_realtime  # noqa: E402

from tests.hardware.gwrun import build, drive  # noqa: E402
from tests.hardware.jackradio import (  # noqa: E402
    RATE,
    RadioSim,
    card_client,
    portaudio_off,
    portaudio_on,
    site_toml,
    start_jackd,
    stop_jackd,
    tone,
)
from tests.waiting import wait_for  # noqa: E402

PERIOD = 256
SAMPLE_S = 0.005


def record(seconds: float) -> np.ndarray:
    """Rows of (time, stamp time, stamp frame, xruns, A rx underruns, B tx underruns)."""
    from gateway.hardware.card_process import STAMP, STAMP_FRAME, XRUNS

    server = f"bllosses{os.getpid()}"
    jackd = start_jackd(server, period=PERIOD)
    rows: list[tuple[float, ...]] = []
    try:
        portaudio_on(server)
        with tempfile.TemporaryDirectory() as tmp:
            gw = build(Path(tmp), site_toml({"radio_a": RADIO, "radio_b": RADIO}))
            sim = RadioSim(server, 2, seconds=seconds + 30)
            sim.connect(0, card_client("radio_a"))
            sim.connect(1, card_client("radio_b"))

            def sample() -> None:
                wait_for(lambda: gw.engine.tick_count >= 100, 60, "the media clock's first 2 s")
                a, b = gw.ports["radio_a"].card, gw.ports["radio_b"].card
                sim.start(0, tone(1000, 1.0, -12), loop=True)
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    s = a.status
                    seq = int(s[STAMP])
                    stamp, frame = float(a.block.clock[0]), int(s[STAMP_FRAME])
                    if seq % 2 == 0 and seq == int(s[STAMP]):  # not torn by a callback
                        rows.append(
                            (
                                time.monotonic(),
                                stamp,
                                frame,
                                int(s[XRUNS]),
                                a.stats()["rx_underruns"],
                                b.stats()["tx_underruns"],
                            )
                        )
                    time.sleep(SAMPLE_S)

            try:
                drive(gw, sample, timeout=seconds + 120)
            finally:
                sim.close()
    finally:
        portaudio_off()
        stop_jackd(jackd)
    return np.array(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument(
        "--realtime",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="PRIO",
        help="run the gateway at SCHED_FIFO PRIO (default 3), as the radio bench does",
    )
    args = parser.parse_args()
    if args.realtime:
        go_realtime(args.realtime)
    rows = record(args.seconds)
    t = rows[:, 0] - rows[0, 0]
    behind = (rows[:, 1] - rows[0, 1]) * RATE - (rows[:, 2] - rows[0, 2])
    # Time lost: the stream stays a period or more further behind than a second before.
    lost_at = []
    for i in np.nonzero(np.diff(behind) >= PERIOD)[0] + 1:
        later = behind[i : i + 40]  # the next 0.2 s
        if np.median(later) - np.median(behind[max(0, i - 200) : i]) >= PERIOD * 0.9:
            lost_at.append(t[i])
    xrun_at = t[np.nonzero(np.diff(rows[:, 3]))[0] + 1]
    under_at = t[np.nonzero(np.diff(rows[:, 4] + rows[:, 5]))[0] + 1]

    def nearest(at: float) -> float:
        return float(np.min(np.abs(xrun_at - at))) if len(xrun_at) else float("inf")

    losing = sum(1 for x in xrun_at if any(abs(x - lost) <= 0.05 for lost in lost_at))
    near = sum(1 for u in under_at if nearest(u) <= 0.5)
    print(
        f"\nAudio server losses (JACK dummy, period {PERIOD}, 48 kHz, {args.seconds:.0f} s, "
        f"tone A→B; load average {os.getloadavg()[0]:.2f})"
    )
    print(
        f"{'xruns':>6} {'that lost time':>14} {'time losses':>11} {'of them no xrun':>15} "
        f"{'underruns':>9} {'≤0.5 s from xrun':>16} {'behind at end ms':>16}"
    )
    unreported = sum(1 for lost in lost_at if not any(abs(x - lost) <= 0.05 for x in xrun_at))
    print(
        f"{len(xrun_at):>6} {losing:>14} {len(lost_at):>11} {unreported:>15} "
        f"{len(under_at):>9} {near:>16} {behind[-1] / RATE * 1000:>16.1f}"
    )
    print(
        "  xruns = changes of card A's xrun count; time losses = steps of a period or more in "
        "how far the stream is behind the wall clock; underruns = card A rx + card B tx."
    )
    for u in under_at:
        print(f"  underrun at {u:7.2f} s, nearest xrun {nearest(u):.2f} s away")
    return 0


if __name__ == "__main__":
    sys.exit(main())
