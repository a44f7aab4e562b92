"""A small WAN between two loopback ports: delay, jitter, loss, reordering and blackout.

This machine's kernel has no ``netem``, so link tests put this relay between two
gateways. It listens on a loopback port and forwards to a loopback target, both
ways, applying an :class:`Impairment` that a test may change while traffic flows
(``relay.impair.loss = 0.05``, ``relay.blackout()`` … ``relay.resume()``).

- **UDP** (:class:`UdpRelay`) works like a NAT: each client address gets its own
  upstream socket, so replies (symmetric RTP) find their way back. Every datagram
  is dropped with probability ``loss``, held ``delay`` ± ``jitter`` (uniform; large
  jitter reorders, as on a real WAN), and with probability ``reorder`` held
  ``reorder_by`` more so later ones overtake it. A blackout drops everything that
  arrives until ``resume()``; datagrams already in flight still arrive.
- **TCP** (:class:`TcpRelay`) keeps the byte order (TCP does): chunks are delayed,
  never lost or reordered. A blackout holds data — and new connections — until
  ``resume()``, as TCP retransmission would; :meth:`TcpRelay.drop_connections`
  resets them all (a peer that died).

Bounded: only loopback addresses, a cap on clients, connections and queued data,
and the relay stops by itself after ``lifetime`` seconds. Random choices come
from a seeded generator, so a test's drop pattern is the same on every run;
counters (:class:`Counts`, per direction) let tests check by counts, not timing,
and a direction's ``trace`` (off by default) tells which datagram met which fate.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_QUEUED_DATAGRAMS = 10_000
MAX_QUEUED_BYTES = 4 * 1024 * 1024
MAX_CLIENTS = 32
MAX_TRACE = 100_000  # datagrams a trace keeps
LIFETIME_S = 120.0


@dataclass
class Impairment:
    """One direction's WAN; change any field live."""

    delay: float = 0.0  # seconds, one way
    jitter: float = 0.0  # ± seconds, uniform
    loss: float = 0.0  # chance a datagram is dropped (UDP)
    reorder: float = 0.0  # chance a datagram is held back reorder_by more (UDP)
    reorder_by: float = 0.030


@dataclass
class Counts:
    received: int = 0
    forwarded: int = 0
    lost: int = 0  # dropped by ``loss``
    blacked_out: int = 0  # dropped during a blackout (UDP)
    reordered: int = 0  # held back by ``reorder``
    overflow: int = 0  # dropped: the queue was full
    # Set to a list to keep each UDP datagram's fate: (its first 12 bytes — an RTP
    # header, in clear even with SRTP —, "lost" | "held" | "sent" | ..., seconds held).
    trace: list[tuple[bytes, str, float]] | None = field(default=None, repr=False)


def _loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the relay only talks to loopback addresses, not {host!r}")
    return host


class _Pipe:
    """One direction: items wait in a heap ordered by when they are due; one timer."""

    def __init__(
        self,
        relay: _Relay,
        impair: Callable[[], Impairment],
        counts: Counts,
        send: Callable[[bytes | None], None],
        stream: bool,
    ) -> None:
        self.relay = relay
        self.impair = impair
        self.counts = counts
        self.send = send
        self.stream = stream  # TCP: keep order, never drop, hold during a blackout
        self.queue: list[tuple[float, int, bytes | None]] = []
        self.queued_bytes = 0
        self.last_due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.seq = itertools.count()

    def push(self, data: bytes | None) -> None:
        """Take one datagram or chunk (None: end of stream, after what came before)."""
        loop = asyncio.get_running_loop()
        self.counts.received += data is not None
        impair, rng = self.impair(), self.relay.rng
        if not self.stream:
            if self.relay.blacked_out:
                self.counts.blacked_out += 1
                self._trace(data, "blacked_out", 0.0)
                return
            if rng.random() < impair.loss:
                self.counts.lost += 1
                self._trace(data, "lost", 0.0)
                return
            if len(self.queue) >= MAX_QUEUED_DATAGRAMS:
                self.counts.overflow += 1
                self._trace(data, "overflow", 0.0)
                return
        wait = max(0.0, impair.delay + rng.uniform(-impair.jitter, impair.jitter))
        fate = "sent"
        if not self.stream and impair.reorder and rng.random() < impair.reorder:
            wait += impair.reorder_by
            self.counts.reordered += 1
            fate = "held"
        if not self.stream:
            self._trace(data, fate, wait)
        due = loop.time() + wait
        if self.stream:
            due = max(due, self.last_due)
            self.last_due = due
            self.queued_bytes += len(data or b"")
        heapq.heappush(self.queue, (due, next(self.seq), data))
        self._schedule()

    def _trace(self, data: bytes | None, fate: str, wait: float) -> None:
        trace = self.counts.trace
        if trace is not None and data is not None and len(trace) < MAX_TRACE:
            trace.append((data[:12], fate, wait))

    def _schedule(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.queue and not (self.stream and self.relay.blacked_out):
            self.timer = asyncio.get_running_loop().call_at(self.queue[0][0], self._fire)

    def _fire(self) -> None:
        self.timer = None
        now = asyncio.get_running_loop().time()
        while (
            self.queue and self.queue[0][0] <= now and not (self.stream and self.relay.blacked_out)
        ):
            _, _, data = heapq.heappop(self.queue)
            self.queued_bytes -= len(data or b"")
            try:
                self.send(data)
            except (OSError, RuntimeError):  # the far side went away: like a lost packet
                continue
            self.counts.forwarded += data is not None
        self._schedule()

    def kick(self) -> None:
        """Blackout over: send what is due (TCP data held meanwhile)."""
        self._schedule()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.queue.clear()


class _Relay:
    """What both relays share: impairments, blackout, counters, lifetime."""

    def __init__(
        self,
        target: tuple[str, int],
        impair: Impairment | None,
        back: Impairment | None,
        listen: tuple[str, int],
        seed: int,
        lifetime: float,
    ) -> None:
        self.target = (_loopback(target[0]), target[1])
        self.listen = (_loopback(listen[0]), listen[1])
        self.impair = impair or Impairment()
        self.back = back  # the return direction's WAN; None: the same as ``impair``
        self.rng = random.Random(seed)
        self.lifetime = lifetime
        self.up = Counts()  # client → target
        self.down = Counts()  # target → client
        self.blacked_out = False
        self.pipes: list[_Pipe] = []
        self.port = 0
        self._expiry: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.stopped = asyncio.Event()

    def _pipe(self, up: bool, send: Callable[[bytes | None], None], stream: bool) -> _Pipe:
        def impair() -> Impairment:
            return self.impair if up or self.back is None else self.back

        pipe = _Pipe(self, impair, self.up if up else self.down, send, stream)
        self.pipes.append(pipe)
        return pipe

    def blackout(self) -> None:
        """Stop forwarding until :meth:`resume` (UDP: dropped; TCP: held)."""
        self.blacked_out = True

    def resume(self) -> None:
        self.blacked_out = False
        for pipe in self.pipes:
            pipe.kick()

    def _arm_lifetime(self) -> None:
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(
            self.lifetime, lambda: self._keep(loop.create_task(self.stop()))
        )

    def _keep(self, task: asyncio.Task[None]) -> None:
        """Hold a reference to a background task until it ends (asyncio keeps weak ones)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        for pipe in self.pipes:
            pipe.close()
        await self._close()
        self.stopped.set()

    async def _close(self) -> None:
        raise NotImplementedError

    async def start(self) -> _Relay:
        raise NotImplementedError

    async def __aenter__(self) -> _Relay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, on_reply: Callable[[bytes], None]) -> None:
        self.on_reply = on_reply

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_reply(data)


class UdpRelay(_Relay, asyncio.DatagramProtocol):
    """UDP between ``listen`` and ``target``, NAT-style (one upstream socket per client)."""

    def __init__(
        self,
        target: tuple[str, int],
        impair: Impairment | None = None,
        *,
        back: Impairment | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        seed: int = 1,
        lifetime: float = LIFETIME_S,
    ) -> None:
        super().__init__(target, impair, back, listen, seed, lifetime)
        self.transport: asyncio.DatagramTransport | None = None
        self.clients: dict[tuple[str, int], tuple[asyncio.DatagramTransport, _Pipe]] = {}
        self._opening: dict[tuple[str, int], list[bytes]] = {}
        self.refused_clients = 0

    async def start(self) -> UdpRelay:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=self.listen
        )
        self.port = self.transport.get_extra_info("sockname")[1]
        self._arm_lifetime()
        return self

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        client = self.clients.get(addr)
        if client is not None:
            client[1].push(data)
        elif addr in self._opening:  # its upstream socket is being opened
            self._opening[addr].append(data)
        elif len(self.clients) + len(self._opening) >= MAX_CLIENTS:
            self.refused_clients += 1
        else:
            self._opening[addr] = [data]
            self._keep(asyncio.get_running_loop().create_task(self._open_client(addr)))

    async def _open_client(self, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        back = self._pipe(False, lambda d: self._to_client(d, addr), stream=False)
        upstream, _ = await loop.create_datagram_endpoint(
            lambda: _Upstream(back.push), local_addr=(self.listen[0], 0), remote_addr=self.target
        )
        pipe = self._pipe(True, lambda d: upstream.sendto(d) if d is not None else None, False)
        self.clients[addr] = (upstream, pipe)
        for data in self._opening.pop(addr, []):
            pipe.push(data)

    def _to_client(self, data: bytes | None, addr: tuple[str, int]) -> None:
        if data is not None and self.transport is not None:
            self.transport.sendto(data, addr)

    async def _close(self) -> None:
        for upstream, _ in self.clients.values():
            upstream.close()
        self.clients.clear()
        if self.transport is not None:
            self.transport.close()


class TcpRelay(_Relay):
    """TCP between ``listen`` and ``target``: delay and jitter keep the byte order."""

    def __init__(
        self,
        target: tuple[str, int],
        impair: Impairment | None = None,
        *,
        back: Impairment | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        seed: int = 1,
        lifetime: float = LIFETIME_S,
        max_connections: int = MAX_CLIENTS,
    ) -> None:
        super().__init__(target, impair, back, listen, seed, lifetime)
        self.max_connections = max_connections
        self.server: asyncio.Server | None = None
        self.connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.accepted = 0
        self.refused_connections = 0
        self._open = asyncio.Event()
        self._open.set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpRelay:
        self.server = await asyncio.start_server(self._handle, *self.listen)
        self.port = self.server.sockets[0].getsockname()[1]
        self._arm_lifetime()
        return self

    def blackout(self) -> None:
        super().blackout()
        self._open.clear()

    def resume(self) -> None:
        self._open.set()
        super().resume()

    def drop_connections(self) -> None:
        """Reset every connection now, as when the peer dies or a middlebox forgets them."""
        for client, upstream in list(self.connections):
            for writer in (client, upstream):
                writer.transport.abort()
        self.connections.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if len(self.connections) >= self.max_connections:
                self.refused_connections += 1
                writer.transport.abort()
                return
            self.accepted += 1
            await self._open.wait()  # a blackout holds new connections too
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.transport.abort()
                return
            pair = (writer, up_writer)
            self.connections.add(pair)
            to_target = self._pipe(True, self._writer_send(up_writer), stream=True)
            to_client = self._pipe(False, self._writer_send(writer), stream=True)
            await asyncio.gather(
                self._pump(reader, to_target),
                self._pump(up_reader, to_client),
                return_exceptions=True,
            )
            self.connections.discard(pair)
        finally:
            if task is not None:
                self._tasks.discard(task)

    @staticmethod
    def _writer_send(writer: asyncio.StreamWriter) -> Callable[[bytes | None], None]:
        def send(data: bytes | None) -> None:
            if writer.transport.is_closing():
                return
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()
            else:
                writer.write(data)

        return send

    async def _pump(self, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        while True:
            while pipe.queued_bytes > MAX_QUEUED_BYTES:  # back-pressure: stop reading
                await asyncio.sleep(0.01)
            try:
                data = await reader.read(65536)
            except (ConnectionError, OSError):
                data = b""
            pipe.push(data or None)
            if not data:
                return

    async def _close(self) -> None:
        self.drop_connections()
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
