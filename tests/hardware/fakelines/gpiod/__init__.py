"""libgpiod 2's API, as far as BorderLink uses it, over a regular file per chip.

The chip "device" is a file holding ``{"<offset>": 0|1}``, the lines' output levels;
a chip file that is gone is an unplugged chip (ENODEV), as the kernel says.
"""

import errno
import json
import os

from .line import Value


def LineSettings(**kwargs):  # noqa: N802  (libgpiod's name)
    return kwargs


class _Request:
    def __init__(self, chip: str, config: dict) -> None:
        self.chip = chip
        for offset, settings in config.items():
            self.set_value(offset, settings.get("output_value", Value.INACTIVE))

    def _levels(self) -> dict:
        try:
            with open(self.chip) as f:
                text = f.read()
        except FileNotFoundError:
            raise OSError(errno.ENODEV, "No such device") from None
        return json.loads(text) if text.strip() else {}

    def set_value(self, offset: int, value) -> None:
        levels = self._levels()
        levels[str(offset)] = int(value == Value.ACTIVE)
        with open(self.chip + ".tmp", "w") as f:
            json.dump(levels, f)
        os.replace(self.chip + ".tmp", self.chip)

    def get_value(self, offset: int):
        return Value.ACTIVE if self._levels().get(str(offset)) else Value.INACTIVE

    def release(self) -> None:
        pass


def request_lines(chip: str, consumer: str, config: dict) -> _Request:
    if not os.path.exists(chip):
        raise OSError(errno.ENOENT, "No such file or directory")
    return _Request(chip, config)
