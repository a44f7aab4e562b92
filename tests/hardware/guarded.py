"""Helpers for PTT guardian tests: fake serial modem lines and GPIO chips that a child process
(the guardian, ``borderlink unkey``) drives, and read them back.

The fakes are in ``fakelines/`` (a ``sitecustomize`` and a ``gpiod`` package), put first on
the child's PYTHONPATH: they fake the OS's interfaces, never our code.
"""

from __future__ import annotations

import json
import os
import termios
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
FAKES = HERE / "fakelines"


def fake_env(modem: Path, **extra: str) -> dict[str, str]:
    """An environment whose Python processes see the fake modem file and the fake gpiod."""
    if not modem.exists():
        modem.write_text(json.dumps({"bits": 0, "unplugged": False}))
    path = os.pathsep.join([str(FAKES), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "FAKE_MODEM": str(modem), **extra}


def modem_state(modem: Path) -> dict:
    return json.loads(modem.read_text())


def rts(modem: Path) -> bool:
    return bool(modem_state(modem)["bits"] & termios.TIOCM_RTS)


def set_modem(modem: Path, **state) -> None:
    modem.write_text(json.dumps({**modem_state(modem), **state}))


def gpio_level(chip: Path, line: int) -> bool | None:
    """The level the fake chip's line was last driven to (None: never)."""
    text = chip.read_text() if chip.exists() else ""
    value = json.loads(text).get(str(line)) if text.strip() else None
    return None if value is None else bool(value)
