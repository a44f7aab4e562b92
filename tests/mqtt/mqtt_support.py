"""A real mosquitto on 127.0.0.1 (free port, stopped by PID) and a recording subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "monitoring"))

from live_site import (
    Probe,
    dominant_hz,
    free_tcp_port,
    http_get,
    live_site,
    require_binary,
    rms_dbfs,
    stop_process,
)

__all__ = [
    "Broker",
    "Probe",
    "Subscriber",
    "dominant_hz",
    "http_get",
    "live_site",
    "rms_dbfs",
]


class Broker:
    """mosquitto on loopback; ``kill`` and ``start`` again on the same port for restarts."""

    def __init__(self, tmp_path: Path) -> None:
        self.binary = require_binary("mosquitto")
        self.port = free_tcp_port()
        self.conf = tmp_path / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\n"
        )
        self.log = tmp_path / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("a"),
        )
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, f"mosquitto exited: {self.log.read_text()}"
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            assert time.monotonic() < deadline, "mosquitto did not open its port within 10 s"
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a goodbye, as on a crash or power loss."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class Subscriber:
    """Collects every message under a topic filter, with retained flags."""

    def __init__(self, port: int, topic: str, **client: Any) -> None:
        self.port = port
        self.topic = topic
        self.client_options = client  # TLS, credentials
        self.messages: list[tuple[str, Any, bool]] = []
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self.client: aiomqtt.Client | None = None

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task

    async def _run(self) -> None:
        name = f"test-{os.getpid()}-{id(self)}"
        options = self.client_options
        async with aiomqtt.Client("127.0.0.1", self.port, identifier=name, **options) as client:
            self.client = client
            await client.subscribe(self.topic, qos=1)
            self._ready.set()
            async for message in client.messages:
                raw = message.payload if isinstance(message.payload, bytes) else b""
                try:
                    payload = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    payload = raw.decode()
                self.messages.append((message.topic.value, payload, bool(message.retain)))

    async def publish(self, topic: str, payload: bytes | str) -> None:
        assert self.client is not None
        await self.client.publish(topic, payload, qos=1)

    def on(self, suffix: str) -> list[Any]:
        return [p for t, p, _ in self.messages if t.endswith(suffix)]
