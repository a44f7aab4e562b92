"""SIP transports on the event loop: UDP here, TCP and TLS in :mod:`.stream`; client
transactions and responses per Via, the same for all three.

:mod:`.message` parses (once per message); this module owns the sockets. Requests we
send over UDP are retransmitted (RFC 3261 timers A/E: 500 ms doubling to 4 s) until a response
arrives or the transaction times out; over TCP/TLS they are sent once (the
stream is reliable). Responses we send go back the way the request came: over
UDP to the address it came from (what ``rport`` asks for, and right for
proxies), over a stream on the same connection; the request's
Via/From/To/Call-ID/CSeq are copied verbatim. Anything that does not parse is
counted and dropped (a request that names its transaction is answered 400) — it
never reaches the call logic and never raises.

:class:`Source` is the contract with the call logic: which transport brought a
message and what that transport proved about the peer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.sip.message import (
    METHODS,
    Address,
    Headers,
    MessageError,
    SipMessage,
    Source,
    parse,
)
from gateway.sip.stream import Connection, Limits, Streams, TlsFiles

log = logging.getLogger(__name__)

T1 = 0.5
T2 = 4.0
ERROR_LOG_SECONDS = 60.0
MAX_DATAGRAM = 16384  # a SIP request bigger than this over UDP is not one we want
TRANSPORTS = ("udp", "tcp", "tls")
DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}
_SIP_URI = re.compile(
    r"^(?P<scheme>sips?):(?:[^@;>?]*@)?(?P<host>[A-Za-z0-9.\-]+)(?::(?P<port>\d{1,5}))?"
    r"(?P<params>;[^?>]*)?",
    re.I,
)


def as_source(where: Address | Source) -> Source:
    return where if isinstance(where, Source) else Source(where)


def uri_source(uri: str) -> Source | None:
    """Where a SIP URI says to send: ``sips:`` → TLS, else its ``;transport=`` (UDP when
    absent), at its port or the transport's default (5060, TLS 5061). None when it is
    not a SIP URI or names a transport we do not speak."""
    match = _SIP_URI.match(uri.strip().strip("<>"))
    if not match:
        return None
    params = {}
    for param in (match["params"] or "").split(";")[1:]:
        name, _, value = param.partition("=")
        params[name.strip().lower()] = value.strip().lower()
    kind = params.get("transport", "udp")
    if match["scheme"].lower() == "sips":
        kind = "tls"  # sips over ";transport=tcp" is TLS over TCP, still TLS
    if kind not in TRANSPORTS:
        return None
    port = int(match["port"]) if match["port"] else DEFAULT_PORTS[kind]
    return Source((match["host"], port), kind)


def new_tag() -> str:
    return secrets.token_hex(6)


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(10)


def new_call_id(host: str) -> str:
    return f"{secrets.token_hex(12)}@{host}"


@dataclass
class TransportStats:
    received: int = 0
    sent: int = 0
    malformed: int = 0
    retransmissions: int = 0
    timeouts: int = 0
    unsent: int = 0  # responses whose connection had gone
    errors: int = 0  # messages the call logic failed on (answered 500): each one is a bug


class SipTransport(asyncio.DatagramProtocol):
    """The gateway's SIP transports. ``on_request(message)`` handles requests.

    It is the UDP socket itself (``open``) and holds the TCP/TLS side in ``streams``
    (``open_streams``); ``send``/``respond``/``request`` pick the one a Source names.
    """

    def __init__(self, on_request: Callable[[SipMessage], None]) -> None:
        self.on_request = on_request
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[tuple[str, int, str], asyncio.Queue[SipMessage]] = {}
        self.stats = TransportStats()
        self.host = "127.0.0.1"
        self.port = 0
        self.streams = Streams(Limits(), TlsFiles(), self._stream_message, self._stream_malformed)
        self._tasks: set[asyncio.Task] = set()
        self._error_logged = -ERROR_LOG_SECONDS

    async def open(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        assert self.transport is not None
        self.host, self.port = self.transport.get_extra_info("sockname")[:2]

    async def open_streams(
        self,
        limits: Limits,
        tls: TlsFiles,
        listen: dict[str, tuple[str, int]],
    ) -> None:
        """TCP/TLS with these caps and certificates; listeners for ``{"tcp"|"tls": (host,
        port)}`` (none: we only connect out, e.g. to a TLS registrar)."""
        self.streams = Streams(limits, tls, self._stream_message, self._stream_malformed)
        for kind, (host, port) in listen.items():
            await self.streams.listen(kind, host, port)

    def port_for(self, kind: str) -> int:
        """The port we listen on for a transport (what Via and Contact say)."""
        return self.streams.ports.get(kind, self.port) if kind != "udp" else self.port

    def via(self, to: Address | Source, host: str) -> str:
        """A Via header for a new request to ``to`` (its transport, our port for it)."""
        kind = as_source(to).transport
        return (
            f"Via: SIP/2.0/{kind.upper()} {host}:{self.port_for(kind)};branch={new_branch()};rport"
        )

    def contact(self, user: str, host: str, to: Address | Source) -> str:
        """Our Contact for a dialog with ``to``: reachable over the same transport.

        Over TLS it is ``sip:…;transport=tls``, also in a ``sips:`` dialog (RFC 3261
        asks for ``sips:`` there, but libre-based phones such as baresip then never
        send their BYE; the transport, TLS, is the same)."""
        kind = as_source(to).transport
        port = self.port_for(kind)
        if kind == "udp":
            return f"<sip:{user}@{host}:{port}>"
        return f"<sip:{user}@{host}:{port};transport={kind}>"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        for task in self._tasks:
            task.cancel()
        self.streams.shutdown()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable etc.: not fatal
        log.debug("SIP socket error: %s", exc)

    def send(self, data: bytes | str, to: Address | Source) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        source = as_source(to)
        if source.transport == "udp":
            if self.transport is not None:
                self.transport.sendto(data, source.address)
                self.stats.sent += 1
            return
        if self.streams.send(data, source.transport, source.address):
            self.stats.sent += 1
        elif data.startswith(b"SIP/2.0 "):
            # The connection it came on has gone: the peer will retransmit or give up.
            # (Opening one to its Via would let a stranger make us connect anywhere.)
            self.stats.unsent += 1
        else:
            self._spawn(self._send_connected(data, source))

    async def _send_connected(self, data: bytes, source: Source) -> None:
        connection = await self._connection(data, source, 8.0)
        if connection is not None and connection.write(data):
            self.stats.sent += 1
        else:
            self.stats.unsent += 1

    def _spawn(self, coro) -> None:  # noqa: ANN001 - a coroutine
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- receive ---------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.received(data, Source(addr))

    def _stream_message(self, data: bytes, connection: Connection) -> None:
        c = connection
        self.received(data, Source(c.address, c.kind, c.identity, c.certificate))

    def _stream_malformed(self) -> None:
        self.stats.malformed += 1

    def received(self, data: bytes, source: Source) -> None:
        """One whole message from any transport (a datagram, or one cut off a stream)."""
        self.stats.received += 1
        message = None
        try:
            message = self._read(data, source)
            if message is not None:
                self._dispatch(message)
        except Exception:  # a message that confuses the call logic must not kill the socket
            self.stats.errors += 1
            now = time.monotonic()
            if now - self._error_logged >= ERROR_LOG_SECONDS:  # a flood is one line a minute
                self._error_logged = now
                log.exception(
                    "SIP message from %s could not be handled (%d so far); answered 500",
                    source,
                    self.stats.errors,
                )
            if message is not None:
                self._server_error(message)

    def _server_error(self, message: SipMessage) -> None:
        """RFC 3261 §21.5.1: the request still gets a final answer, 500."""
        if message.is_response or message.method == "ACK":
            return
        try:
            self.respond(message, 500, "Server Internal Error")
        except Exception:  # noqa: BLE001 - the 500 is a courtesy; the socket must live
            log.debug("no 500 for a message from %s", message.source)

    def _read(self, data: bytes, source: Source) -> SipMessage | None:
        """The message, parsed once; None when it was dropped or answered 400 (counted)."""
        if len(data) > MAX_DATAGRAM and source.transport == "udp":
            self.stats.malformed += 1
            return None
        if len(data) < 20 or b"\r\n\r\n" not in data:
            if data.strip(b"\r\n\x00"):  # bare CRLF keepalives are fine, silently
                self.stats.malformed += 1
            return None
        try:
            return parse(data, source)
        except MessageError as error:
            self.stats.malformed += 1
            log.debug("malformed SIP message from %s: %s", source, error)
            answerable = error.request and error.headers.transaction() is not None
            if answerable and not data.startswith(b"ACK "):
                self._send_response(error.headers, source, 400, "Bad Request")
            return None

    def _dispatch(self, message: SipMessage) -> None:
        if message.is_response:
            queue = self.pending.get(message.transaction)
            if queue is not None:
                queue.put_nowait(message)
        elif message.method not in METHODS:
            if message.method != "ACK":
                self.respond(message, 501, "Not Implemented")
        else:
            self.on_request(message)

    # --- responses ---------------------------------------------------------------------

    def response(
        self,
        request: SipMessage,
        code: int,
        reason: str,
        to_tag: str = "",
        headers: list[str] | None = None,
        body: str = "",
    ) -> bytes:
        """Our response to ``request``, to go back where it came from."""
        return _response(request.headers, request.source, code, reason, to_tag, headers, body)

    def respond(
        self,
        request: SipMessage,
        code: int,
        reason: str,
        to_tag: str = "",
        headers: list[str] | None = None,
        body: str = "",
    ) -> bytes:
        data = self.response(request, code, reason, to_tag, headers, body)
        self.send(data, request.source)
        return data

    def _send_response(self, request: Headers, source: Source, code: int, reason: str) -> None:
        self.send(_response(request, source, code, reason), source)

    # --- client transactions ----------------------------------------------------------

    async def _connection(self, raw: bytes, source: Source, timeout: float) -> Connection | None:
        """The stream a request to ``source`` goes on: the open connection, else a new one.

        A peer that connected to us did so from a port nobody listens on; once that
        connection has gone, an in-dialog request goes where its Request-URI (the
        peer's Contact) says, on the host the connection came from (RFC 3261 §8.1.2
        without a route set; never another host a stranger could name).
        """
        kind, address = source.transport, source.address
        if not self.streams.is_open(kind, address) and self.streams.was_inbound(kind, address):
            uri = raw.split(b" ", 2)[1].decode("utf-8", "replace") if b" " in raw else ""
            target = uri_source(uri)
            if target is not None and target.address[0] == address[0]:
                address = target.address
            else:
                address = (address[0], DEFAULT_PORTS[kind])
        return await self.streams.connect(kind, address, timeout)

    def request_now(
        self, data: str, to: Source, timeout: float
    ) -> asyncio.Future[SipMessage | None]:
        """:meth:`request`, but written in this very call when a stream to ``to`` is open
        (not at the loop's next turn, after the tick's RTP); the final response to come."""
        raw = data.encode("utf-8")
        key = parse(raw, to).transaction
        queue: asyncio.Queue[SipMessage] = asyncio.Queue()
        self.pending[key] = queue
        if to.transport == "udp" or not self.streams.send(raw, to.transport, to.address):
            self.pending.pop(key, None)
            answer = asyncio.ensure_future(self.request(data, to, timeout))
        else:
            self.stats.sent += 1
            answer = asyncio.ensure_future(self._final(key, queue, timeout))
        self._tasks.add(answer)  # (cancelled when the transport closes)
        answer.add_done_callback(self._tasks.discard)
        return answer

    async def _final(
        self, key: tuple[str, int, str], queue: asyncio.Queue[SipMessage], timeout: float
    ) -> SipMessage | None:
        """The final response to a request sent once on a stream (None: none in time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while (wait := deadline - loop.time()) > 0:
                try:
                    message = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    break
                if message.status >= 200:
                    return message
            self.stats.timeouts += 1
            return None
        finally:
            self.pending.pop(key, None)

    async def request(
        self, data: str, address: Address | Source, timeout: float, ringing_timeout: float = 60.0
    ) -> SipMessage | None:
        """Send a request; the final response, or None on timeout.

        Retransmits over UDP until any response; after a provisional (1xx) it waits
        up to ``ringing_timeout`` for the final one. Over TCP/TLS it is sent once, on
        an open connection to that peer or a new one (a TLS server must verify).
        """
        raw = data.encode("utf-8")
        source = as_source(address)
        key = parse(raw, source).transaction
        reliable = source.transport != "udp"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        queue: asyncio.Queue[SipMessage] = asyncio.Queue()
        self.pending[key] = queue
        interval = T1
        provisional = False
        try:
            if reliable:
                connection = await self._connection(raw, source, timeout)
                if connection is None or not connection.write(raw):
                    self.stats.timeouts += 1
                    return None
                self.stats.sent += 1
            else:
                self.send(raw, source)
            while True:
                now = loop.time()
                if now >= deadline:
                    self.stats.timeouts += 1
                    return None
                wait = deadline - now if provisional or reliable else min(interval, deadline - now)
                try:
                    message = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if not provisional and not reliable:
                        self.send(raw, source)
                        self.stats.retransmissions += 1
                        interval = min(interval * 2, T2)
                    continue
                if message.status >= 200:
                    return message
                if not provisional:
                    provisional = True
                    deadline = loop.time() + ringing_timeout
        finally:
            self.pending.pop(key, None)


def _response(
    request: Headers,
    source: Source,
    code: int,
    reason: str,
    to_tag: str = "",
    headers: list[str] | None = None,
    body: str = "",
) -> bytes:
    """A response to a request with these headers, which came from ``source``: its
    Via/From/To/Call-ID/CSeq copied, the top Via saying where it really came from."""
    host, port = source.address
    lines = [f"SIP/2.0 {code} {reason}"]
    top_via = True
    for name, value in request.copied():
        if name == "Via":
            if top_via:  # RFC 3581: say where it really came from
                value = re.sub(r";rport(?=;|$)", f";rport={port}", value)
                if ";received=" not in value:
                    value += f";received={host}"
                top_via = False
        elif name == "To" and to_tag and ";tag=" not in value:
            value = f"{value};tag={to_tag}"
        lines.append(f"{name}: {value}")
    lines += headers or []
    lines.append("User-Agent: BorderLink")
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")
