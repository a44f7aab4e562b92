"""SIP transports on the event loop: UDP here, TCP and TLS in :mod:`.stream`; client
transactions and responses per Via, the same for all three.

pyVoIP parses; this module owns the sockets. Requests we send over UDP are
retransmitted (RFC 3261 timers A/E: 500 ms doubling to 4 s) until a response
arrives or the transaction times out; over TCP/TLS they are sent once (the
stream is reliable). Responses we send go back the way the request came: over
UDP to the address it came from (what ``rport`` asks for, and right for
proxies), over a stream on the same connection; the request's
Via/From/To/Call-ID/CSeq are copied verbatim. Anything that does not parse is
counted and dropped — it never reaches the call logic and never raises.

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
from dataclasses import dataclass, field

from gateway.sip.pyvoip import PARSED_METHODS, SIPMessage, parse
from gateway.sip.stream import Connection, Limits, Streams, TlsFiles

log = logging.getLogger(__name__)

T1 = 0.5
T2 = 4.0
ERROR_LOG_SECONDS = 60.0
MAX_DATAGRAM = 16384  # a SIP request bigger than this over UDP is not one we want
_CALL_ID = re.compile(rb"^(?:Call-ID|i)\s*:\s*(.+?)\s*$", re.M | re.I)
_CSEQ = re.compile(rb"^CSeq\s*:\s*(\d+)\s+([A-Za-z]+)\s*$", re.M | re.I)
_COPIED = ("via", "from", "to", "call-id", "cseq", "v", "f", "t", "i")

Address = tuple[str, int]
TRANSPORTS = ("udp", "tcp", "tls")
DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}
_SIP_URI = re.compile(
    r"^(?P<scheme>sips?):(?:[^@;>?]*@)?(?P<host>[A-Za-z0-9.\-]+)(?::(?P<port>\d{1,5}))?"
    r"(?P<params>;[^?>]*)?",
    re.I,
)


@dataclass(frozen=True)
class Source:
    """Where a SIP message came from (or goes to), and what its transport proved.

    ``identity`` is set only by a transport that authenticated the peer (a TLS
    certificate that verified); nothing the peer wrote in a header ever lands here.
    Responses go back over the same transport, to ``address``.
    """

    address: Address
    transport: str = "udp"  # "udp" | "tcp" | "tls"
    identity: str = ""  # verified TLS peer identity (certificate name or pin), else ""
    # The verified TLS certificate itself (DER), for a caller with its own trust rules (links).
    certificate: bytes = field(default=b"", compare=False, repr=False)

    @property
    def secure(self) -> bool:
        return self.transport == "tls"

    def __str__(self) -> str:
        return f"{self.transport}:{self.address[0]}:{self.address[1]}"


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


def raw_headers(data: bytes) -> list[tuple[str, str]]:
    """Header lines as (name, value), in order, repeated names kept (pyVoIP keeps one)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    out = []
    for line in head.split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out.append((name.strip(), value.strip()))
    return out


def transaction_key(data: bytes) -> tuple[str, int, str] | None:
    call_id = _CALL_ID.search(data)
    cseq = _CSEQ.search(data)
    if not call_id or not cseq:
        return None
    return (
        call_id.group(1).decode("utf-8", "replace"),
        int(cseq.group(1)),
        cseq.group(2).decode().upper(),
    )


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
    """The gateway's SIP transports. ``on_request(message, raw, source)`` handles requests.

    It is the UDP socket itself (``open``) and holds the TCP/TLS side in ``streams``
    (``open_streams``); ``send``/``respond``/``request`` pick the one a Source names.
    """

    def __init__(self, on_request: Callable[[SIPMessage, bytes, Source], None]) -> None:
        self.on_request = on_request
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[tuple[str, int, str], asyncio.Queue[SIPMessage]] = {}
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
        try:
            self._dispatch(data, source)
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
            self._server_error(data, source)

    def _server_error(self, data: bytes, source: Source) -> None:
        """RFC 3261 §21.5.1: the request still gets a final answer, 500."""
        first = data.split(b"\r\n", 1)[0]
        if first.startswith((b"SIP/2.0", b"ACK ")) or transaction_key(data) is None:
            return
        try:
            self.respond(data, source, 500, "Server Internal Error")
        except Exception:  # noqa: BLE001 - the 500 is a courtesy; the socket must live
            log.debug("no 500 for a message from %s", source)

    def _dispatch(self, data: bytes, source: Source) -> None:
        if len(data) > MAX_DATAGRAM and source.transport == "udp":
            self.stats.malformed += 1
            return
        if len(data) < 20 or b"\r\n\r\n" not in data:
            if data.strip(b"\r\n\x00"):  # bare CRLF keepalives are fine, silently
                self.stats.malformed += 1
            return
        first = data.split(b"\r\n", 1)[0]
        if first.startswith(b"SIP/2.0 "):
            message = parse(data)
            key = transaction_key(data)
            if message is None or key is None:
                self.stats.malformed += 1
                return
            queue = self.pending.get(key)
            if queue is not None:
                queue.put_nowait(message)
            return
        parts = first.split(b" ")
        if len(parts) != 3 or parts[2] != b"SIP/2.0" or not parts[0].isalpha():
            self.stats.malformed += 1
            return
        method = parts[0].decode()
        if method not in PARSED_METHODS:
            if transaction_key(data) is None:
                self.stats.malformed += 1
                return
            if method != "ACK":
                self.respond(data, source, 501, "Not Implemented")
            return
        message = parse(data)
        if message is None:
            self.stats.malformed += 1
            if transaction_key(data) is not None and method != "ACK":
                self.respond(data, source, 400, "Bad Request")
            return
        self.on_request(message, data, source)

    # --- responses ---------------------------------------------------------------------

    def response(
        self,
        request: bytes,
        source: Source,
        code: int,
        reason: str,
        to_tag: str = "",
        headers: list[str] | None = None,
        body: str = "",
    ) -> bytes:
        host, port = source.address
        lines = [f"SIP/2.0 {code} {reason}"]
        top_via = True
        for name, value in raw_headers(request):
            low = name.lower()
            if low not in _COPIED:
                continue
            if low in ("via", "v"):
                for via in value.split(","):
                    via = via.strip()
                    if top_via:  # RFC 3581: say where it really came from
                        via = re.sub(r";rport(?=;|$)", f";rport={port}", via)
                        if ";received=" not in via:
                            via += f";received={host}"
                        top_via = False
                    lines.append(f"Via: {via}")
            elif low in ("to", "t") and to_tag and ";tag=" not in value:
                lines.append(f"To: {value};tag={to_tag}")
            else:
                lines.append(f"{name}: {value}")
        lines += headers or []
        lines.append("User-Agent: BorderLink")
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")

    def respond(
        self,
        request: bytes,
        source: Source,
        code: int,
        reason: str,
        to_tag: str = "",
        headers: list[str] | None = None,
        body: str = "",
    ) -> bytes:
        data = self.response(request, source, code, reason, to_tag, headers, body)
        self.send(data, source)
        return data

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
    ) -> asyncio.Future[SIPMessage | None]:
        """:meth:`request`, but written in this very call when a stream to ``to`` is open
        (not at the loop's next turn, after the tick's RTP); the final response to come."""
        raw = data.encode("utf-8")
        key = transaction_key(raw)
        assert key is not None, "request without Call-ID/CSeq"
        queue: asyncio.Queue[SIPMessage] = asyncio.Queue()
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
        self, key: tuple[str, int, str], queue: asyncio.Queue[SIPMessage], timeout: float
    ) -> SIPMessage | None:
        """The final response to a request sent once on a stream (None: none in time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while (wait := deadline - loop.time()) > 0:
                try:
                    message = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    break
                if int(message.status) >= 200:
                    return message
            self.stats.timeouts += 1
            return None
        finally:
            self.pending.pop(key, None)

    async def request(
        self, data: str, address: Address | Source, timeout: float, ringing_timeout: float = 60.0
    ) -> SIPMessage | None:
        """Send a request; the final response, or None on timeout.

        Retransmits over UDP until any response; after a provisional (1xx) it waits
        up to ``ringing_timeout`` for the final one. Over TCP/TLS it is sent once, on
        an open connection to that peer or a new one (a TLS server must verify).
        """
        raw = data.encode("utf-8")
        key = transaction_key(raw)
        assert key is not None, "request without Call-ID/CSeq"
        source = as_source(address)
        reliable = source.transport != "udp"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        queue: asyncio.Queue[SIPMessage] = asyncio.Queue()
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
                if int(message.status) >= 200:
                    return message
                if not provisional:
                    provisional = True
                    deadline = loop.time() + ringing_timeout
        finally:
            self.pending.pop(key, None)
