"""Waiting for a condition in tests: poll it with a timeout, never sleep in its place.

``wait_for`` (blocking) and ``until`` (async) take the same arguments in the same order:
the condition, how long to wait at most, what is awaited (for the failure message) and how
often to look. Both return the condition's first truthy value, so a test can wait for a
thing and use it. On a timeout they fail naming what did not happen and the last value the
condition gave, which is usually what the reader of a failed run needs first.

Timeouts are generous on purpose: CI shares two cores with other jobs, and a condition that
holds returns at once however long the timeout is.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

INTERVAL = 0.02  # s between looks: one media tick


def wait_for(
    condition: Callable[[], T], timeout: float, what: str, interval: float = INTERVAL
) -> T:
    """Call ``condition`` every ``interval`` s until it returns something truthy, and
    return that; fail after ``timeout`` s naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(timeout, what, value))
        time.sleep(interval)


async def until(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float,
    what: str,
    interval: float = INTERVAL,
) -> T:
    """``wait_for`` for a test on the event loop: the loop runs between looks, and
    ``condition`` may be a coroutine function (a query to another process, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(timeout, what, value))
        await asyncio.sleep(interval)


def _timed_out(timeout: float, what: str, last: object) -> str:
    seen = repr(last)
    if len(seen) > 300:
        seen = seen[:300] + "..."
    return f"timed out after {timeout:g}s waiting for {what} (last seen: {seen})"
