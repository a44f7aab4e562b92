"""Run a real Gateway (its own media clock, under asyncio) while a test scenario runs beside it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gateway.app import Gateway
from gateway.config import load_config
from gateway.engine import Event
from tests.hardware.failsafe_site import losses
from tests.hardware.jackradio import LEAST_WAIT_S
from tests.waiting import wait_for

T = TypeVar("T")


def build(tmp_path: Path, toml: str) -> Gateway:
    path = tmp_path / "site.toml"
    path.write_text(toml)
    return Gateway(load_config(path))


def drive(gw: Gateway, scenario: Callable[[], T], timeout: float = 30.0) -> T:
    """Run ``gw`` on its real clock while ``scenario`` runs on a worker thread; then stop it."""

    async def main() -> T:
        loop = asyncio.get_running_loop()
        run = asyncio.create_task(gw.run(seconds=timeout))
        try:
            return await loop.run_in_executor(None, scenario)
        finally:
            gw.stop()
            await run

    return asyncio.run(main())


class EventLog:
    def __init__(self, gw: Gateway) -> None:
        self.events: list[Event] = []
        gw.engine.listeners.append(self.events.append)

    def of(self, kind: str, port: str | None = None) -> list[Event]:
        return [e for e in self.events if e.kind == kind and (port is None or e.port == port)]


def losses_seen(gw: Gateway, sim=None, ticks: int = 3) -> int:
    """Every loss counted so far (``failsafe_site.losses``), once the engine has ticked
    ``ticks`` more times (call it from a scenario's thread): a card's underrun is counted
    at the tick after it, so a gap at the very end of a window is counted only then."""
    seen = gw.engine.tick_count
    wait_for(lambda: gw.engine.tick_count >= seen + ticks, LEAST_WAIT_S, "the gateway to tick")
    return losses(gw, sim)
