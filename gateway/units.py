"""Durations and levels as radio people write them: "800ms", "1.5s", "3min", "-12dB".

A bare number in a config file is ambiguous (is a hang time of 2 two seconds or two
milliseconds?), so durations must carry their unit. Values are kept in seconds.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h)\s*$")
_SCALE = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """Return seconds for '800ms', '1.5s', '3min', '1h'; 0 is allowed bare (0 or "0")."""
    if isinstance(value, str) and value.strip() == "0":
        value = 0  # "off" written either way means the same
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '800ms' or '1.5s', not true/false")
    if isinstance(value, int | float):
        if value == 0:
            return 0.0
        raise ValueError(
            f"a duration needs a unit: write '{value}ms' or '{value}s', not a bare {value}"
        )
    if not isinstance(value, str):
        raise ValueError("expected a duration such as '800ms' or '1.5s'")
    match = _DURATION.match(value)
    if not match:
        raise ValueError(
            f"'{value}' is not a duration; write a number and a unit: '800ms', '1.5s', '3min'"
        )
    return float(match.group(1)) * _SCALE[match.group(2)]


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}min"
    return f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
"""A duration in seconds, written with a unit in config files."""


def db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))
