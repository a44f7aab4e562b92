"""libgpiod 2's ``gpiod.line`` enums."""

import enum


class Direction(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class Value(enum.Enum):
    INACTIVE = 0
    ACTIVE = 1
