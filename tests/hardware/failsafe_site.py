"""A gateway process for fail-safe tests: runs a site and reports its radios' state as JSON lines.

python failsafe_site.py SITE.toml run      run on the real clock until a signal
python failsafe_site.py SITE.toml raise    tick until radio_b is keyed, then die of an
                                           unhandled exception (only atexit is left)
python failsafe_site.py SITE.toml abort    tick until radio_b is keyed, then os.abort()
                                           (no atexit, no cleanup: only the guardian)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from gateway.hardware.ptt import shared_guardian

from gateway.app import Gateway
from gateway.config import load_config


def losses(gw: Gateway, sim=None) -> int:
    """Every loss a radio's audio can show as a gap: FIFO underruns, audio-server xruns
    and ticks the media clock skipped (a starved gateway says so: the stall is counted).
    Given the radio simulator (``tests.hardware.jackradio.RadioSim``), also the times its
    own playback ran dry: a starved test harness, whose radio sent silence for a while."""
    cards = [port.card.stats() for port in gw.ports.values() if hasattr(port, "card")]
    counted = sum(c["rx_underruns"] + c["tx_underruns"] + c["xruns"] for c in cards)
    return int(counted + gw.clock.skipped_ticks + (sim.underruns if sim is not None else 0))


def status(gw: Gateway) -> None:
    radio = gw.ports["radio_b"]
    other = gw.ports.get("other")
    print(
        json.dumps(
            {
                "now": time.monotonic(),  # system-wide: a test compares it with its own
                "tick": gw.engine.tick_count,
                "losses": losses(gw),
                "keyed": radio.ptt.keyed,
                "device_up": radio.card.up,
                "device_errors": radio.stats()["device_errors"],
                "reopens": radio.card.counts["reopens"],
                "other_heard": other is not None and other.last_heard is not None,
                "up": {
                    name: port.card.up for name, port in gw.ports.items() if hasattr(port, "card")
                },
                "guardian": shared_guardian().pid,
                "heartbeat_timeout": shared_guardian().timeout,
                "pid": os.getpid(),
            }
        ),
        flush=True,
    )


async def report(gw: Gateway) -> None:
    while True:
        status(gw)
        await asyncio.sleep(0.1)


async def run(gw: Gateway) -> None:
    task = asyncio.create_task(report(gw))
    try:
        await gw.run()
    finally:
        task.cancel()
        print(json.dumps({"stopped": True}), flush=True)


def main() -> None:
    gw = Gateway(load_config(sys.argv[1]))
    if sys.argv[2] == "run":
        asyncio.run(run(gw))
        return
    deadline = time.monotonic() + 10
    while not gw.ports["radio_b"].ptt.keyed and time.monotonic() < deadline:
        gw.engine.tick()
        time.sleep(0.02)
    status(gw)
    if sys.argv[2] == "abort":
        os.abort()
    raise RuntimeError("a bug nobody caught")


if __name__ == "__main__":
    main()
