"""The browser dispatcher console: operator login, WebRTC (Opus) talk and monitor,
who-is-talking over a WebSocket, served by the gateway's one web server.

Importing the package registers the ``[console]`` section, the console routes
and the ``borderlink passwd`` command. aiortc and the server are imported only
when a site has a ``[console]`` section, so other commands start as fast as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.web import register_routes
from gateway.webrtc import config, passwords  # noqa: F401  ([console], borderlink passwd)

if TYPE_CHECKING:
    from gateway.app import Gateway


@register_routes
def _console_routes(app: web.Application, gateway: Gateway) -> None:
    if gateway.config.section("console") is None:
        return
    from gateway.webrtc.server import install

    install(app, gateway)
