"""SIP over TCP and TLS (RFC 3261 §18.3): framing by Content-Length, one table of connections.

A byte stream has no message boundaries, so each message is cut off the stream by
its ``Content-Length`` (which a stream message must carry); several messages in one
read and one message over many reads are both normal. Everything else here is about
strangers, who can open connections for free:

* caps on connections, in total and per source address, and on how many new ones
  an address may open a second (a TLS handshake costs the gateway about a
  millisecond of CPU), checked when the TCP connection is accepted — before any
  handshake is paid for;
* a handshake must finish within ``handshake_timeout``; a message, once started,
  within ``message_timeout`` (a slow sender holds no buffer for long); a
  connection with no traffic for ``idle_timeout`` is closed;
* a head larger than ``max_header`` or a Content-Length beyond ``max_message``
  closes the connection (there is no way to find the next message after it);
* a peer that stops reading cannot make us buffer without bound.

Responses go back on the connection the request came on. Requests we send reuse an
open connection to that peer (one we opened or one it opened to us) or open one;
servers we connect to must prove who they are (:mod:`.tls`). CRLF keepalives
(RFC 5626 §3.5.1: a double CRLF "ping") are answered with a single CRLF "pong".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.sip.tls import HandshakeLog, client_context, peer_identity, server_context

log = logging.getLogger(__name__)

Address = tuple[str, int]
Key = tuple[str, Address]  # (transport, address): the connection a Source names
INBOUND_REMEMBERED = 4096
RATES_REMEMBERED = 4096  # addresses whose connection rate is tracked (oldest forgotten)
PING = b"\r\n\r\n"
PONG = b"\r\n"


class FramingError(Exception):
    """The stream cannot be read further: the connection must be closed."""


@dataclass(frozen=True)
class Limits:
    max_message: int = 65536
    max_header: int = 16384
    idle_timeout: float = 300.0
    message_timeout: float = 10.0
    handshake_timeout: float = 5.0
    max_connections: int = 1000
    max_per_address: int = 20
    rate_per_address: float = 10.0  # new connections a second (and as many at once)


@dataclass(frozen=True)
class TlsFiles:
    certificate: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    pins: frozenset[str] = frozenset()

    def contexts(self) -> list[ssl.SSLContext]:
        """Both TLS contexts built from the files now on disk (raises when they don't load)."""
        made = [client_context(self.certificate, self.key, self.ca, pinned=bool(self.pins))]
        if self.certificate is not None and self.key is not None:
            made.append(server_context(self.certificate, self.key, self.ca))
        return made


@dataclass(frozen=True)
class PeerTls:
    """How one peer we connect to is verified, instead of ``[sip]``'s files (a link peer:
    its agency's CA and the name its certificate must carry, or pinned fingerprints)."""

    context: ssl.SSLContext
    server_name: str
    pins: frozenset[str] = frozenset()


def content_length(head: bytes) -> int:
    """The head's Content-Length (``l`` compact form too); FramingError when absent or bad."""
    found: int | None = None
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon or name.strip().lower() not in (b"content-length", b"l"):
            continue
        value = value.strip()
        if not value.isdigit() or len(value) > 9:
            raise FramingError(f"bad Content-Length {value[:20]!r}")
        if found is not None and found != int(value):
            raise FramingError("two different Content-Lengths")
        found = int(value)
    if found is None:
        raise FramingError("no Content-Length (required on TCP/TLS)")
    return found


class Framer:
    """Cuts SIP messages off a byte stream. ``feed`` returns the complete ones (``b""`` for
    a keepalive ping) and raises FramingError when the stream can no longer be trusted."""

    def __init__(self, max_message: int, max_header: int) -> None:
        self.max_message = max_message
        self.max_header = max_header
        self.buffer = bytearray()
        self._scanned = 0  # where to resume looking for the end of the head

    @property
    def pending(self) -> bool:
        """A message has started and not yet ended."""
        return bool(self.buffer)

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        out: list[bytes] = []
        buffer = self.buffer
        while buffer:
            if buffer.startswith(b"\r\n"):  # keepalives between messages
                if buffer.startswith(PING):
                    del buffer[:4]
                    out.append(b"")
                elif len(buffer) >= 4 or buffer[2:3] not in (b"", b"\r"):
                    del buffer[:2]
                else:
                    break  # maybe the start of a ping: wait for the rest
                self._scanned = 0
                continue
            end = buffer.find(b"\r\n\r\n", self._scanned)
            if end < 0:
                if len(buffer) > self.max_header:
                    raise FramingError(f"head longer than {self.max_header} bytes")
                self._scanned = max(0, len(buffer) - 3)
                break
            if end + 4 > self.max_header:
                raise FramingError(f"head longer than {self.max_header} bytes")
            length = content_length(bytes(buffer[:end]))
            total = end + 4 + length
            if total > self.max_message:
                raise FramingError(f"message of {total} bytes, over {self.max_message}")
            if len(buffer) < total:
                self._scanned = end  # the head is known; wait for the body
                break
            out.append(bytes(buffer[:total]))
            del buffer[:total]
            self._scanned = 0
        return out


@dataclass
class StreamStats:
    connections_refused: int = 0  # over a cap
    handshake_failures: int = 0
    idle_closed: int = 0
    slow_closed: int = 0  # a message took longer than message_timeout
    framing_errors: int = 0
    connect_failures: int = 0  # connections we tried to open
    connected: int = 0  # connections we opened


class Connection(asyncio.Protocol):
    """One TCP or TLS connection, either way. The owner (:class:`Streams`) keeps the table.

    TLS runs here over memory BIOs rather than asyncio's ``start_tls``: the caps are
    checked on the bare TCP connection before any handshake work, a failed handshake
    is seen (and counted) with its reason, and no byte can arrive before the peer's
    identity is known (uvloop delivers data before a ``pause_reading()`` in
    ``connection_made`` takes hold, which makes ``start_tls`` lose the ClientHello).
    """

    def __init__(self, owner: Streams, kind: str, outgoing: Address | None = None) -> None:
        self.owner = owner
        self.kind = kind  # "tcp" | "tls"
        self.outgoing = outgoing  # the address we connected to, else None (they called us)
        self.transport: asyncio.Transport | None = None
        self.address: Address = outgoing or ("", 0)
        self.identity = ""
        self.certificate = b""  # the peer's verified TLS certificate (DER), else b""
        self.open = False  # handshake done and in the table
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.framer = Framer(owner.limits.max_message, owner.limits.max_header)
        self.started = time.monotonic()
        self.last_activity = self.started
        self.message_started: float | None = None
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()

    @property
    def key(self) -> Key:
        return (self.kind, self.address)

    # --- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        owner = self.owner
        if self.outgoing is None:
            peer = transport.get_extra_info("peername")
            self.address = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        if not owner.admit(self):
            transport.abort()
            self._settle(False)
            return
        if self.kind != "tls":
            owner.opened(self)
            self._settle(True)
            return
        try:
            if self.outgoing is None:
                context = owner.server_tls
                self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
            else:
                peer = owner.peer_tls.get(self.outgoing)
                context = peer.context if peer else owner.client_tls
                host = peer.server_name if peer else self.outgoing[0]
                self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=host)
        except (ssl.SSLError, ValueError) as exc:
            self.fail_handshake(str(exc))
            return
        self._handshake()

    def data_received(self, data: bytes) -> None:
        if self._tls is None:
            self._received(data)
            return
        self._incoming.write(data)
        if not self.open:
            self._handshake()
            if not self.open:
                return
        chunks = []
        ended = False
        while True:
            try:
                chunk = self._tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                ended = True
                break
            except ssl.SSLError as exc:  # a corrupt record
                self._flush()
                self.owner.framing_error(self, f"TLS: {exc.reason or exc}")
                return
            if not chunk:  # the peer's close_notify: TLS is over on this connection
                ended = True
                break
            chunks.append(chunk)
        self._flush()
        if chunks:
            self._received(b"".join(chunks))
        if ended:
            self.close()

    def _handshake(self) -> None:
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:  # a stranger's bad certificate, or not TLS at all
            self._flush()
            self.fail_handshake(_reason(exc))
            return
        self._flush()
        pins = frozenset()
        if self.outgoing is not None:
            peer = self.owner.peer_tls.get(self.outgoing)
            pins = peer.pins if peer else self.owner.tls.pins
        identity = peer_identity(self._tls, pins)
        if identity is None:
            self.fail_handshake("certificate is not one of tls_pins")
            return
        self.identity = identity
        self.certificate = self._tls.getpeercert(binary_form=True) or b""
        self.owner.opened(self)
        self._settle(True)

    def fail_handshake(self, reason: str) -> None:
        self.owner.handshake_failed(self.address[0], reason)
        self._settle(False)
        self.close()

    def _settle(self, ok: bool) -> None:
        if not self.ready.done():
            self.ready.set_result(ok)

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _received(self, data: bytes) -> None:
        """Plain SIP bytes (after TLS, if any): cut them into messages."""
        if not self.open:
            return
        now = time.monotonic()
        self.last_activity = now
        try:
            messages = self.framer.feed(data)
        except FramingError as exc:
            self.owner.framing_error(self, str(exc))
            return
        for message in messages:
            if not self.open:
                return
            if not message:
                self.write(PONG)
            else:
                self.owner.deliver(message, self)
        if not self.framer.pending:
            self.message_started = None
        elif messages or self.message_started is None:
            self.message_started = now

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._settle(False)
        self.owner.forget(self)

    # --- sending ---------------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        transport = self.transport
        if not self.open or transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > 4 * self.owner.limits.max_message:
            # The peer stopped reading what we send: a stranger's way to eat our memory.
            self.owner.stats.framing_errors += 1
            self.close()
            return False
        if self._tls is None:
            transport.write(data)
            return True
        try:
            self._tls.write(data)
        except ssl.SSLError:
            self.close()
            return False
        self._flush()
        return True

    def close(self) -> None:
        self.open = False
        self._settle(False)
        if self.transport is not None:
            self.transport.abort()
        self.owner.forget(self)


def _reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({exc.verify_message})"
    return exc.reason or str(exc)


class Streams:
    """Listeners, the table of open connections, and the caps and timers that guard them.

    ``on_message(data, connection)`` gets every complete message;
    ``on_malformed()`` is called for each stream that had to be closed as unreadable.
    """

    def __init__(
        self,
        limits: Limits,
        tls: TlsFiles,
        on_message: Callable[[bytes, Connection], None],
        on_malformed: Callable[[], None],
    ) -> None:
        self.limits = limits
        self.tls = tls
        self.on_message = on_message
        self.on_malformed = on_malformed
        self.stats = StreamStats()
        self.handshakes = HandshakeLog()
        self.connections: dict[Key, Connection] = {}
        self.pending: set[Connection] = set()  # accepted, handshake not yet done
        self.per_address: dict[str, int] = {}
        self.ports: dict[str, int] = {}  # transport → the port we listen on
        self._servers: list[asyncio.base_events.Server] = []
        self._connecting: dict[Key, asyncio.Future[Connection | None]] = {}
        self._inbound: OrderedDict[Key, None] = OrderedDict()  # recent peers who called us
        self._rates: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when
        self._server_tls: ssl.SSLContext | None = None
        self._client_tls: ssl.SSLContext | None = None
        # Peers verified by their own rules (links), by the address we connect to.
        self.peer_tls: dict[Address, PeerTls] = {}
        self.client_cas: tuple[Path, ...] = ()  # more CAs whose certificates identify callers
        self._sweeper: asyncio.Task | None = None

    # --- set-up ----------------------------------------------------------------------

    def use_tls(self, tls: TlsFiles) -> None:
        """New TLS files (a reload): the next handshake builds its context from them."""
        self.tls = tls
        self._server_tls = self._client_tls = None

    @property
    def server_tls(self) -> ssl.SSLContext:
        if self._server_tls is None:
            assert self.tls.certificate is not None and self.tls.key is not None
            self._server_tls = server_context(
                self.tls.certificate, self.tls.key, self.tls.ca, self.client_cas
            )
        return self._server_tls

    def trust_callers(self, cas: tuple[Path, ...]) -> None:
        """Also accept callers' certificates issued by these CAs (the links' peer CAs);
        connections accepted from now on use them."""
        if cas != self.client_cas:
            self.client_cas = cas
            self._server_tls = None

    @property
    def client_tls(self) -> ssl.SSLContext:
        if self._client_tls is None:
            self._client_tls = client_context(
                self.tls.certificate, self.tls.key, self.tls.ca, pinned=bool(self.tls.pins)
            )
        return self._client_tls

    async def listen(self, kind: str, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        if kind == "tls":
            self.server_tls  # noqa: B018 - build it now: a bad file fails the start, not a call
        server = await loop.create_server(
            lambda: Connection(self, kind), host, port, reuse_address=True, backlog=128
        )
        self._servers.append(server)
        self.ports[kind] = server.sockets[0].getsockname()[1]
        self._start_sweeper()

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())

    def shutdown(self) -> None:
        """Stop listening and drop every connection (now; ``close`` also reaps the tasks)."""
        for server in self._servers:
            server.close()
        self._servers.clear()
        for connection in [*self.connections.values(), *self.pending]:
            connection.close()
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def close(self) -> None:
        sweeper = self._sweeper
        self.shutdown()
        if sweeper is not None:
            with contextlib.suppress(BaseException):
                await sweeper
        self._sweeper = None

    # --- the table -------------------------------------------------------------------

    def admit(self, connection: Connection) -> bool:
        """Caps on connections from outside, before anything else is spent on them.
        (Connections we open are not capped: config bounds them.)"""
        if connection.outgoing is not None:
            self.pending.add(connection)
            return True
        host = connection.address[0]
        total = len(self.connections) + len(self.pending)
        if (
            total >= self.limits.max_connections
            or self.per_address.get(host, 0) >= self.limits.max_per_address
            or not self._within_rate(host)
        ):
            self.stats.connections_refused += 1
            return False
        self.per_address[host] = self.per_address.get(host, 0) + 1
        self.pending.add(connection)
        return True

    def _within_rate(self, host: str) -> bool:
        """A token bucket per source address: ``rate_per_address`` new connections a
        second, as many in a burst. The table is bounded; a forgotten address starts full."""
        rate = self.limits.rate_per_address
        now = time.monotonic()
        tokens, then = self._rates.pop(host, (rate, now))
        tokens = min(rate, tokens + (now - then) * rate)
        allowed = tokens >= 1.0
        self._rates[host] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._rates) > RATES_REMEMBERED:
            self._rates.popitem(last=False)
        return allowed

    def opened(self, connection: Connection) -> None:
        self.pending.discard(connection)
        old = self.connections.get(connection.key)
        if old is not None and old is not connection:
            old.close()  # a peer reconnecting from the same address and port
        connection.open = True
        connection.last_activity = time.monotonic()
        self.connections[connection.key] = connection
        if connection.outgoing is None:
            self._inbound[connection.key] = None
            self._inbound.move_to_end(connection.key)
            while len(self._inbound) > INBOUND_REMEMBERED:
                self._inbound.popitem(last=False)

    def forget(self, connection: Connection) -> None:
        counted = connection in self.pending or self.connections.get(connection.key) is connection
        self.pending.discard(connection)
        if self.connections.get(connection.key) is connection:
            del self.connections[connection.key]
        if counted and connection.outgoing is None:
            host = connection.address[0]
            left = self.per_address.get(host, 0) - 1
            if left > 0:
                self.per_address[host] = left
            else:
                self.per_address.pop(host, None)

    def is_open(self, kind: str, address: Address) -> bool:
        connection = self.connections.get((kind, address))
        return connection is not None and connection.open

    def was_inbound(self, kind: str, address: Address) -> bool:
        """The peer at this address connected to us (from a port it does not listen on)."""
        return (kind, address) in self._inbound

    def handshake_failed(self, peer: str, reason: str) -> None:
        self.stats.handshake_failures += 1
        self.handshakes.failed(peer, reason)

    def framing_error(self, connection: Connection, reason: str) -> None:
        self.stats.framing_errors += 1
        self.on_malformed()
        log.debug(
            "SIP %s stream from %s:%s closed: %s", connection.kind, *connection.address, reason
        )
        connection.close()

    def deliver(self, message: bytes, connection: Connection) -> None:
        self.on_message(message, connection)

    async def _sweep(self) -> None:
        """Close idle connections and slow senders (one task for all connections)."""
        limits = self.limits
        shortest = min(limits.message_timeout, limits.idle_timeout, limits.handshake_timeout)
        period = max(0.05, shortest / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for connection in list(self.pending):
                if now - connection.started > limits.handshake_timeout:
                    connection.fail_handshake("handshake timed out")
            for connection in list(self.connections.values()):
                started = connection.message_started
                if started is not None and now - started > limits.message_timeout:
                    self.stats.slow_closed += 1
                    self.on_malformed()
                    connection.close()
                elif now - connection.last_activity > limits.idle_timeout:
                    self.stats.idle_closed += 1
                    connection.close()

    # --- sending -----------------------------------------------------------------------

    def send(self, data: bytes, kind: str, address: Address) -> bool:
        connection = self.connections.get((kind, address))
        return connection is not None and connection.open and connection.write(data)

    async def connect(self, kind: str, address: Address, timeout: float) -> Connection | None:
        """An open connection to ``address``: the one in the table, or a new one (TLS
        verified); None when it cannot be made."""
        key = (kind, address)
        connection = self.connections.get(key)
        if connection is not None and connection.open:
            return connection
        waiting = self._connecting.get(key)
        if waiting is not None:  # someone is already connecting there: share it
            return await asyncio.shield(waiting)
        future: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        self._connecting[key] = future
        try:
            connection = await self._connect(kind, address, timeout)
            future.set_result(connection)
            return connection
        except BaseException:
            future.set_result(None)
            raise
        finally:
            del self._connecting[key]

    async def _connect(self, kind: str, address: Address, timeout: float) -> Connection | None:
        loop = asyncio.get_running_loop()
        host, port = address
        if kind == "tls":
            self.client_tls  # noqa: B018 - a context that cannot be built fails here, not later
        self._start_sweeper()  # it times out the handshake
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Connection(self, kind, outgoing=address), host, port
                ),
                timeout,
            )
        except (OSError, TimeoutError) as exc:
            self.stats.connect_failures += 1
            log.debug("SIP %s connection to %s:%s failed: %s", kind, host, port, exc)
            return None
        assert isinstance(connection, Connection)
        self.stats.connected += 1
        try:
            ok = await asyncio.wait_for(asyncio.shield(connection.ready), timeout)
        except TimeoutError:
            connection.fail_handshake("handshake timed out")
            return None
        return connection if ok else None
