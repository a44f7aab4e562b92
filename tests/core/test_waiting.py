"""The one wait helper: returns what the condition gave, or fails naming what and the last value."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.waiting import until, wait_for


def test_wait_for_returns_the_first_truthy_value() -> None:
    counts = itertools.count()
    assert wait_for(lambda: next(counts) >= 3 and "ready", 30, "the third look", 0.001) == "ready"


def test_wait_for_names_what_and_the_last_value_seen() -> None:
    with pytest.raises(AssertionError, match=r"waiting for the queue to fill \(last seen: \[\]\)"):
        wait_for(lambda: [], 0.05, "the queue to fill", 0.01)


def test_until_awaits_a_coroutine_condition_and_returns_its_value() -> None:
    looks: list[int] = []

    async def answer() -> int:
        looks.append(1)
        return len(looks) if len(looks) >= 3 else 0

    assert asyncio.run(until(answer, 30, "three looks", 0.001)) == 3


def test_until_fails_the_same_way() -> None:
    with pytest.raises(AssertionError, match=r"after 0.05s waiting for a reply \(last seen: 0\)"):
        asyncio.run(until(lambda: 0, 0.05, "a reply", 0.01))
