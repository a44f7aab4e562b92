"""Stopping a background task for sure.

On Python 3.11 ``asyncio.wait_for`` can swallow a cancellation that lands as its
inner wait completes (CPython gh-86296, fixed in 3.12): the task then carries on
as if never cancelled, and ``await task`` after ``task.cancel()`` waits forever.
A registration or dial-out that a reload removed must really stop, so cancel
until it is done.
"""

from __future__ import annotations

import asyncio


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel ``task`` and wait until it has ended (cancelled again if it shrugged)."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()  # retrieved: a task that failed before it was stopped is not an error
