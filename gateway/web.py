"""The gateway's one web server (aiohttp): console, APIs, /metrics, /healthz.

Endpoints add their routes here (``routes`` in :mod:`gateway.endpoints`), so the
console and the metrics exporter share one listening socket, one TLS set-up and
one access log.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from pydantic import Field

from gateway.config import Model
from gateway.endpoints import load

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)


class WebConfig(Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tls_certificate: Path | None = None
    tls_key: Path | None = None

    def file_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """The TLS certificate and key load together (as the server will load them)."""
        if self.tls_certificate is None:
            return []
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls_certificate, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            return [
                (
                    ("tls_certificate",),
                    f"{self.tls_certificate} with key {self.tls_key}: "
                    f"does not load ({why}); the web server would not start",
                )
            ]
        return []

    def summary_lines(self) -> list[str]:
        scheme = "https" if self.tls_certificate else "http"
        return [f"{scheme}://{self.host}:{self.port}/ (console, /metrics, /healthz, /readyz)"]


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
"""The running Gateway, for route handlers: ``request.app[GATEWAY]``."""

RouteInstaller = Callable[[web.Application, "Gateway"], None]
"""Adds an endpoint's routes to the gateway's web app (once, when the server starts)."""


class WebServer:
    def __init__(self, gateway: Gateway, config: WebConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.app = web.Application()
        self.app[GATEWAY] = gateway
        for endpoint in gateway.config.endpoints:  # a section's routes only when it is there
            if not endpoint.section or gateway.config.section(endpoint.section) is not None:
                for installer in endpoint.routes:
                    load(installer)(self.app, gateway)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        ssl_context = None
        if self.config.tls_certificate:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.config.tls_certificate, self.config.tls_key)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.config.host, self.config.port, ssl_context=ssl_context)
        await site.start()
        sockets = site._server.sockets if site._server else []  # port 0 → the one the OS chose
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        scheme = "https" if ssl_context else "http"
        log.info("web server on %s://%s:%s/", scheme, self.config.host, self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
