"""A stand-in gateway for PTT guardian tests without an audio server: keys one PTT line
through the guardian, ticks (the heartbeat) every 20 ms, and prints its state as JSON lines.

    python ptt_client.py serial|cm108|gpio DEVICE [run|segv]

``segv`` dies of a real segmentation fault once the line is keyed.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

from gateway.hardware import ptt


def main() -> None:
    kind, device, mode = sys.argv[1], sys.argv[2], (sys.argv[3:] or ["run"])[0]
    keyer = {
        "serial": lambda: ptt.SerialKeyer(device, "rts"),
        "cm108": lambda: ptt.Cm108Keyer(device),
        "gpio": lambda: ptt.GpioKeyer(device, 17),
    }[kind]()
    controller = ptt.PttController(keyer, "radio", tot=0)
    controller.open()
    controller.key(True)
    guardian = ptt.shared_guardian()
    while True:
        controller.fed()
        print(
            json.dumps(
                {
                    "keyed": controller.keyed,
                    "pid": os.getpid(),
                    "guardian": guardian.pid,
                    "heartbeat_timeout": guardian.timeout,
                }
            ),
            flush=True,
        )
        if mode == "segv" and controller.keyed:
            ctypes.string_at(0)
        time.sleep(0.02)


if __name__ == "__main__":
    main()
