"""Stopping the gateway closes its MQTT connection on every path: connected, waiting for the
broker's CONNACK, retrying, refused.

Why: a client left open when the event loop ends is closed later by the garbage
collector, which calls back into the dead loop (``Exception ignored in
Client.__del__ ... Event loop is closed``) in whatever test or shutdown step
happens to be running then, and keeps a TCP connection the broker sees as alive.
Each test stops a real gateway, collects garbage after its loop has closed, and
checks that no connection of this process to the broker's port is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from mqtt_support import Broker, Subscriber, live_site
from test_mqtt_live import PREFIX, TONES_ONLY, site
from test_mqtt_tls import make_pki

from tests.conftest import free_port
from tests.waiting import until

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def connections_to(port: int) -> int:
    """TCP sockets of this process whose far end is 127.0.0.1:``port`` (from /proc)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                ours.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if int(remote.split(":")[1], 16) == port and state != "0A" and inode in ours:
                count += 1
    return count


def run_and_stop(port: int, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run ``scenario`` (a gateway started and stopped inside it); check that the stop
    closed every connection to ``port`` while the loop still ran, and that nothing is
    left for the garbage collector to close into the dead loop afterwards."""

    async def then_check() -> None:
        await scenario()
        assert connections_to(port) == 0, f"the stopped gateway left a connection to {port}"

    asyncio.run(then_check())
    gc.collect()  # a leaked client's __del__ raises here (an error under filterwarnings)
    assert connections_to(port) == 0


def test_stop_while_the_broker_refuses_connections(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there

    async def scenario() -> None:
        async with live_site(tmp_path, site(port, TONES_ONLY)) as gw:
            await until(lambda: gw.mqtt.attempts >= 3, 10, "three refused attempts")
            assert not gw.mqtt.connected
            assert gw.mqtt.last_error

    run_and_stop(port, scenario)


def test_stop_while_waiting_for_the_brokers_answer(tmp_path: Path) -> None:
    """A broker that takes the TCP connection and never answers CONNACK (hung, overloaded)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.setblocking(False)
    accepted: list[socket.socket] = []

    def accept() -> bool:
        with contextlib.suppress(BlockingIOError):
            accepted.append(listener.accept()[0])
        return bool(accepted)

    async def scenario() -> None:
        async with live_site(tmp_path, site(port, TONES_ONLY)) as gw:
            await until(accept, 10, "the gateway to open a TCP connection")
            await until(lambda: connections_to(port) == 1, 10, "the gateway's side of it")
            assert not gw.mqtt.connected

    try:
        run_and_stop(port, scenario)
        peer = accepted[0]
        peer.settimeout(2)
        while peer.recv(4096):  # the CONNECT it sent, then the end of the stream
            pass
    finally:
        for sock in (*accepted, listener):
            sock.close()


def test_stop_while_the_tls_handshake_is_still_in_progress(tmp_path: Path) -> None:
    """The connect runs in a worker thread that cannot be interrupted; here the broker
    completes the TLS handshake only as the gateway stops, so the connection opens
    after the stop began. The gateway must still close it before its loop ends."""
    ca, cert, key = make_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = threading.Event()
    answer = threading.Event()
    done = threading.Event()
    peers: list[socket.socket] = []

    def broker() -> None:  # TCP at once, the TLS handshake when told, then silence
        listener.settimeout(10)
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            peers.append(conn)
            accepted.set()
            if answer.wait(10):
                peers.append(context.wrap_socket(conn, server_side=True))
        done.set()

    thread = threading.Thread(target=broker, daemon=True)
    thread.start()
    config = site(port, TONES_ONLY, f'tls = true\nca_file = "{ca}"')

    async def scenario() -> None:
        async with live_site(tmp_path, config) as gw:
            await until(accepted.is_set, 10, "the gateway to open a TCP connection")
            service = gw.mqtt
            stop = service.stop

            async def stop_as_the_broker_answers() -> None:
                answer.set()
                await stop()

            service.stop = stop_as_the_broker_answers

    try:
        run_and_stop(port, scenario)
        assert done.wait(10), "the broker thread did not finish"
    finally:
        answer.set()
        thread.join(10)
        for sock in (*peers, listener):
            sock.close()


def test_stop_while_connected_and_after_the_broker_vanished(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()

    async def scenario() -> None:
        async with live_site(tmp_path, site(broker.port, TONES_ONLY)):
            async with Subscriber(broker.port, f"{PREFIX}/status") as sub:
                await until(
                    lambda: "online" in sub.on("/status"), 10, "the gateway's online status"
                )
            assert connections_to(broker.port) == 1  # the subscriber's own is closed
            broker.kill()  # and the gateway stops before (or as) it notices

    try:
        run_and_stop(broker.port, scenario)
    finally:
        broker.kill()


def test_stop_while_connected_says_offline(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()

    async def scenario() -> None:
        async with Subscriber(broker.port, f"{PREFIX}/status") as sub:
            async with live_site(tmp_path, site(broker.port, TONES_ONLY)) as gw:
                await until(lambda: gw.mqtt.connected, 10, "the connection")
                await until(lambda: "online" in sub.on("/status"), 10, "the online status")
            await until(lambda: sub.on("/status")[-1] == "offline", 10, "the offline status")
            assert connections_to(broker.port) == 1  # only the subscriber's

    try:
        run_and_stop(broker.port, scenario)
    finally:
        broker.kill()
