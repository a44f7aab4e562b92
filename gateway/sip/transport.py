"""SIP over UDP on the event loop: one socket, client transactions, responses per Via.

pyVoIP parses; this module owns the socket. Requests we send are retransmitted
(RFC 3261 timers A/E: 500 ms doubling to 4 s) until a response arrives or the
transaction times out; responses we send go back to the address the request
came from (what ``rport`` asks for, and right for proxies), with the request's
Via/From/To/Call-ID/CSeq copied verbatim. Anything that does not parse is
counted and dropped — it never reaches the call logic and never raises.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from gateway.sip.pyvoip import PARSED_METHODS, SIPMessage, parse

log = logging.getLogger(__name__)

T1 = 0.5
T2 = 4.0
MAX_DATAGRAM = 16384  # a SIP request bigger than this over UDP is not one we want
_CALL_ID = re.compile(rb"^(?:Call-ID|i)\s*:\s*(.+?)\s*$", re.M | re.I)
_CSEQ = re.compile(rb"^CSeq\s*:\s*(\d+)\s+([A-Za-z]+)\s*$", re.M | re.I)
_COPIED = ("via", "from", "to", "call-id", "cseq", "v", "f", "t", "i")

Address = tuple[str, int]


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

    @property
    def secure(self) -> bool:
        return self.transport == "tls"

    def __str__(self) -> str:
        return f"{self.transport}:{self.address[0]}:{self.address[1]}"


def as_source(where: Address | Source) -> Source:
    return where if isinstance(where, Source) else Source(where)


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


class SipTransport(asyncio.DatagramProtocol):
    """The gateway's SIP socket. ``on_request(message, raw, source)`` handles requests."""

    def __init__(self, on_request: Callable[[SIPMessage, bytes, Source], None]) -> None:
        self.on_request = on_request
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[tuple[str, int, str], asyncio.Queue[SIPMessage]] = {}
        self.stats = TransportStats()
        self.host = "127.0.0.1"
        self.port = 0

    async def open(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        assert self.transport is not None
        self.host, self.port = self.transport.get_extra_info("sockname")[:2]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable etc.: not fatal
        log.debug("SIP socket error: %s", exc)

    def send(self, data: bytes | str, to: Address | Source) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        if self.transport is not None:
            self.transport.sendto(data, as_source(to).address)
            self.stats.sent += 1

    # --- receive ---------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.stats.received += 1
        try:
            self._dispatch(data, addr)
        except Exception:  # a message that confuses the call logic must not kill the socket
            self.stats.malformed += 1
            log.exception("SIP message from %s:%s could not be handled", *addr)

    def _dispatch(self, data: bytes, addr: Address) -> None:
        if len(data) > MAX_DATAGRAM or len(data) < 20 or b"\r\n\r\n" not in data:
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
                self.respond(data, Source(addr), 501, "Not Implemented")
            return
        message = parse(data)
        if message is None:
            self.stats.malformed += 1
            if transaction_key(data) is not None and method != "ACK":
                self.respond(data, Source(addr), 400, "Bad Request")
            return
        self.on_request(message, data, Source(addr))

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

    async def request(
        self, data: str, address: Address | Source, timeout: float, ringing_timeout: float = 60.0
    ) -> SIPMessage | None:
        """Send a request; the final response, or None on timeout.

        Retransmits until any response; after a provisional (1xx) it waits up to
        ``ringing_timeout`` for the final one.
        """
        raw = data.encode("utf-8")
        key = transaction_key(raw)
        assert key is not None, "request without Call-ID/CSeq"
        queue: asyncio.Queue[SIPMessage] = asyncio.Queue()
        self.pending[key] = queue
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = T1
        provisional = False
        try:
            self.send(raw, address)
            while True:
                now = loop.time()
                if now >= deadline:
                    self.stats.timeouts += 1
                    return None
                wait = deadline - now if provisional else min(interval, deadline - now)
                try:
                    message = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if not provisional:
                        self.send(raw, address)
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
