"""Dial-out patches: a talkgroup that calls a number and keeps the call up.

``when = "always"``: the call is placed at start and redialled whenever it drops.
``when = "active"``: placed when someone talks in the talkgroup, hung up after
``idle_hangup`` of silence. Failed or dropped calls are redialled with backoff
(``retry_min`` doubling to ``retry_max``), so a far end that is down is not
hammered, and one that comes back is reached again without anyone's help.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.engine import Engine, Event
from gateway.sip.calls import CallManager, Dialog
from gateway.sip.config import DialOutConfig
from gateway.sip.tasks import cancel_and_wait

log = logging.getLogger(__name__)

STABLE_SECONDS = 10.0  # a call that lasted this long resets the backoff


class DialOut:
    def __init__(self, name: str, entry: DialOutConfig, calls: CallManager, engine: Engine) -> None:
        self.name = name
        self.entry = entry
        self.calls = calls
        self.engine = engine
        self.dialog: Dialog | None = None
        self.attempts = 0
        self.connects = 0
        self._activity = asyncio.Event()
        self._last_talk = 0.0
        self._task: asyncio.Task | None = None
        engine.listeners.append(self._on_event)

    def _on_event(self, event: Event) -> None:
        if event.kind == "talk_start" and event.port and self._in_talkgroup(event.port):
            self._last_talk = asyncio.get_running_loop().time()
            self._activity.set()

    def _in_talkgroup(self, port: str) -> bool:
        members = self.engine.talkgroups.get(self.entry.talkgroup)
        attached = self.engine.attached.get(port)
        return bool(
            (members and port in members.members)
            or (attached and attached[0] == self.entry.talkgroup)
        )

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._on_event in self.engine.listeners:
            self.engine.listeners.remove(self._on_event)
        await cancel_and_wait(self._task)
        if self.dialog is not None:  # the patch is gone (reload, shutdown): so is its call
            await self.calls.hangup(self.dialog)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.entry.retry_min
        while True:
            if self.entry.when == "active":
                self._activity.clear()
                await self._activity.wait()
            self.attempts += 1
            dialog = await self.calls.dial(self.entry.uri, self.entry.talkgroup, self.entry)
            if dialog is None:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.entry.retry_max)
                continue
            self.dialog = dialog
            self.connects += 1
            started = loop.time()
            self._last_talk = started
            await self._hold(dialog)
            self.dialog = None
            if loop.time() - started >= STABLE_SECONDS:
                backoff = self.entry.retry_min
            if self.entry.when == "always":
                log.info("dial-out %s dropped; redialling in %.0fs", self.name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.entry.retry_max)

    async def _hold(self, dialog: Dialog) -> None:
        if self.entry.when == "always":
            await dialog.ended.wait()
            return
        loop = asyncio.get_running_loop()
        while not dialog.ended.is_set():
            idle_for = loop.time() - self._last_talk
            if idle_for >= self.entry.idle_hangup:
                log.info("dial-out %s idle for %.0fs; hanging up", self.name, idle_for)
                await self.calls.hangup(dialog)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dialog.ended.wait(), self.entry.idle_hangup - idle_for)
