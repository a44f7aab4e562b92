"""/metrics, /healthz and /readyz on the gateway's one web server.

- ``/metrics``: Prometheus text format, built on the loop thread in slices that
  each start right after a tick and last at most a quarter frame, so a scrape of a
  big site never holds up the media clock (:meth:`SiteMetrics.page`).
- ``/healthz``: liveness. 200 while the media clock is ticking; 503 when it has
  stalled (the process is alive but audio is not moving: restart it).
- ``/readyz``: readiness. 200 when every configured port is up, else 503; the
  JSON body says which ports are up or down and why, for a human or a probe.

Needs a ``[web]`` section (the same server carries the console).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web
from gateway.monitoring.metrics import SiteMetrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from gateway.app import Gateway

STALLED_AFTER_S = 1.0  # the clock is this far behind its schedule: not alive


def install(app: web.Application, gateway: Gateway) -> None:
    metrics = SiteMetrics.of(gateway)

    async def scrape(request: web.Request) -> web.Response:
        body = await metrics.page()  # between ticks, in slices: never holds a tick up
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        ok, reason = clock_alive(gateway)
        return web.json_response({"alive": ok, "reason": reason}, status=200 if ok else 503)

    async def readyz(request: web.Request) -> web.Response:
        ready, ports = readiness(gateway)
        return web.json_response({"ready": ready, "ports": ports}, status=200 if ready else 503)

    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def clock_alive(gateway: Gateway) -> tuple[bool, str]:
    """Is the media clock keeping its schedule? (ticks done vs ticks due)."""
    clock = gateway.clock
    if clock.start is None:
        return False, "media clock not started"
    due = clock.deadline(clock.ticks + clock.skipped_ticks)
    behind = time.monotonic() - due
    if behind > STALLED_AFTER_S:
        return False, f"media clock stalled: {behind:.1f}s behind schedule"
    return True, "media clock ticking"


def readiness(gateway: Gateway) -> tuple[bool, dict[str, dict[str, object]]]:
    """Which ports are up; ready when all configured ones are (calls do not count)."""
    engine = gateway.engine
    tick = engine.tick_count
    ports: dict[str, dict[str, object]] = {}
    ready = True
    for port in engine.ports:
        health = engine.health.get(port.name)
        isolated = health is not None and health.down_until_tick > tick
        try:
            device_up = port.stats().get("device_up", 1) != 0
        except Exception:
            device_up = False
        not_started = getattr(port, "down_reason", "")
        up = not isolated and device_up and not not_started
        entry: dict[str, object] = {"kind": port.kind, "up": up}
        if not_started:
            entry["reason"] = f"cannot start: {not_started}"
        elif isolated and health is not None:
            entry["reason"] = health.last_fault
        elif not device_up:
            entry["reason"] = "device down"
        ports[port.name] = entry
        if not up and port.name in gateway.ports:
            ready = False
    missing = [n for n, c in gateway.config.ports.items() if c.enabled and n not in ports]
    for name in missing:
        ports[name] = {
            "kind": gateway.config.ports[name].kind,
            "up": False,
            "reason": "not on the engine",
        }
        ready = False
    return ready, ports
