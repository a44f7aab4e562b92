"""SIP over TCP and TLS against a hostile peer: raw sockets written here, the real gateway.

Framing (split and merged messages, keepalives), the caps a stranger runs into
(huge Content-Length, no Content-Length, a head that never ends, a slow sender,
too many connections) and TLS peers that must be refused (untrusted client
certificate, not TLS at all, a handshake that never comes).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path

from sip_peers import run, running_gateway

from gateway.demo.pki import Authority
from tests.conftest import free_port
from tests.waiting import until


def site(sip: str) -> str:
    return f"""
[site]
name = "sip-streams-test"
country = "CA"

[ports.radio1]
kind = "simulated_radio"
talk_offset = "1h"

[talkgroups.marine]
members = ["radio1"]

[sip]
listen = "127.0.0.1:{free_port()}"
listen_tcp = "127.0.0.1:{free_port()}"
{sip}

[sip.routes."6001"]
talkgroup = "marine"
public = true
"""


def options(cseq: int, body: bytes = b"", compact: bool = False) -> bytes:
    length = "l" if compact else "Content-Length"
    head = (
        "OPTIONS sip:6001@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKraw{cseq}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:tester@127.0.0.1>;tag=raw\r\n"
        "To: <sip:6001@127.0.0.1>\r\n"
        "Call-ID: raw-stream-test@127.0.0.1\r\n"
        f"CSeq: {cseq} OPTIONS\r\n"
        + ("Content-Type: application/sdp\r\n" if body else "")
        + f"{length}: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_message(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """One SIP message off a stream, cut by its Content-Length (as the gateway must)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"content-length", b"l"):
            length = int(value)
    return head + await asyncio.wait_for(reader.readexactly(length), timeout)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the gateway closes the connection (EOF or reset) within ``timeout``."""
    try:
        while await asyncio.wait_for(reader.read(4096), timeout):
            pass
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    return True


def streams(gw):
    return gw.sip.transport.streams


def test_split_and_merged_messages_and_keepalives_on_tcp():
    async def scenario() -> None:
        async with running_gateway(site("")) as gw:
            port = gw.sip.transport.port_for("tcp")
            malformed = gw.sip.transport.stats.malformed
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            # Split: a head cut in the middle of a line, then its body over two writes.
            first = options(1, body=b"v=0\r\ns=split across writes\r\n")
            writer.write(first[:25])
            await writer.drain()
            await until(
                lambda: any(c.framer.pending for c in streams(gw).connections.values()),
                5,
                "the gateway to hold the first half",
            )
            writer.write(first[25:-4])
            await writer.drain()
            await asyncio.sleep(0.05)  # give a wrong framer the chance to cut too early
            writer.write(first[-4:])
            await writer.drain()
            answer = await read_message(reader)
            assert answer.startswith(b"SIP/2.0 200 OK") and b"CSeq: 1 OPTIONS" in answer

            # Merged: three messages (one with the compact "l" header) and a ping in one write.
            writer.write(
                options(2) + options(3, b"v=0\r\n", compact=True) + b"\r\n\r\n" + options(4)
            )
            await writer.drain()
            answers = [await read_message(reader) for _ in range(2)]
            pong = await asyncio.wait_for(reader.readexactly(2), 5)
            answers.append(await read_message(reader))
            assert [a.split(b"CSeq: ")[1].split(b"\r\n")[0] for a in answers] == [
                b"2 OPTIONS",
                b"3 OPTIONS",
                b"4 OPTIONS",
            ]
            assert pong == b"\r\n", "a CRLF ping is answered with a CRLF pong"
            assert gw.sip.transport.stats.malformed == malformed
            writer.close()

    run(scenario())


def test_huge_or_missing_content_length_and_endless_head_close_the_connection():
    sip = "max_message_bytes = 8192\nmax_header_bytes = 4096"

    async def scenario() -> None:
        async with running_gateway(site(sip)) as gw:
            port = gw.sip.transport.port_for("tcp")
            stats = gw.sip.transport.stats
            cases = {
                "huge Content-Length": options(1).replace(
                    b"Content-Length: 0", b"Content-Length: 99999999"
                ),
                "no Content-Length": options(2).replace(b"Content-Length: 0\r\n", b""),
                "head that never ends": b"OPTIONS sip:x SIP/2.0\r\n" + b"X-Junk: y\r\n" * 1000,
                "two Content-Lengths": options(3).replace(
                    b"Content-Length: 0", b"Content-Length: 0\r\nContent-Length: 5"
                ),
            }
            for what, data in cases.items():
                before = stats.malformed
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(data)
                await writer.drain()
                assert await closed_by_peer(reader, 5), f"{what}: the connection stayed open"
                assert stats.malformed == before + 1, f"{what}: not counted"
                writer.close()
            assert gw.sip.stats()["sip_messages_malformed"] >= len(cases)
            # The gateway still serves well-behaved peers.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(options(9))
            assert (await read_message(reader)).startswith(b"SIP/2.0 200")
            writer.close()

    run(scenario())


def test_slow_sender_and_idle_connection_are_cut_off():
    sip = 'message_timeout = "1s"\nconnection_idle_timeout = "2s"'

    async def scenario() -> None:
        async with running_gateway(site(sip)) as gw:
            port = gw.sip.transport.port_for("tcp")
            s = streams(gw).stats
            # A slow-loris sender: one byte every 100 ms keeps the connection busy (not
            # idle) but would take 30 s for one message.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            message = options(1)

            async def dribble() -> None:
                for byte in message:
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.1)

            sender = asyncio.ensure_future(dribble())
            try:
                assert await closed_by_peer(reader, 10), "the slow sender was not cut off"
                assert not sender.done(), "the message was sent whole before the cut"
            finally:
                sender.cancel()
            assert s.slow_closed == 1
            writer.close()
            # A connection that says nothing is closed after the idle timeout.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await closed_by_peer(reader, 10), "the idle connection stayed open"
            assert s.idle_closed == 1
            writer.close()

    run(scenario())


def test_connection_caps_in_total_and_per_address():
    sip = "max_connections = 4\nmax_connections_per_address = 2"

    async def scenario() -> None:
        async with running_gateway(site(sip)) as gw:
            port = gw.sip.transport.port_for("tcp")

            async def connect(source: str):
                return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))

            async def served(pair, cseq: int) -> bool:
                reader, writer = pair
                writer.write(options(cseq))
                try:
                    return (await read_message(reader, 3)).startswith(b"SIP/2.0 200")
                except (ConnectionError, asyncio.IncompleteReadError):
                    return False

            a1, a2 = await connect("127.0.0.1"), await connect("127.0.0.1")
            assert await served(a1, 1) and await served(a2, 2)
            a3 = await connect("127.0.0.1")  # third from one address: over the per-address cap
            assert await closed_by_peer(a3[0], 5), "a third connection from one address"
            b1, b2 = await connect("127.0.0.2"), await connect("127.0.0.2")
            assert await served(b1, 3) and await served(b2, 4)
            c1 = await connect("127.0.0.3")  # fifth in all: over the total cap
            assert await closed_by_peer(c1[0], 5), "a fifth connection in all"
            assert streams(gw).stats.connections_refused == 2
            assert gw.sip.stats()["sip_connections"] == 4
            # A place freed is a place again.
            a1[1].close()
            await until(lambda: gw.sip.stats()["sip_connections"] == 3, 5, "the close to be seen")
            c2 = await connect("127.0.0.3")
            assert await served(c2, 5)
            for pair in (a2, a3, b1, b2, c1, c2):
                pair[1].close()

    run(scenario())


def test_new_connections_per_second_per_address_are_capped():
    """A stranger cannot make the gateway pay for handshake after handshake: each address
    opens at most max_connection_rate_per_address new connections a second."""
    sip = "max_connection_rate_per_address = 2"

    async def scenario() -> None:
        async with running_gateway(site(sip)) as gw:
            port = gw.sip.transport.port_for("tcp")

            async def attempt(source: str, cseq: int) -> bool:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0)
                )
                writer.write(options(cseq))
                try:
                    return (await read_message(reader, 5)).startswith(b"SIP/2.0 200")
                except (ConnectionError, asyncio.IncompleteReadError):
                    return False
                finally:
                    writer.close()

            started = time.monotonic()
            served = [await attempt("127.0.0.5", n) for n in range(10)]
            elapsed = time.monotonic() - started
            # A full bucket of 2, then 2 more a second: however slow this machine is.
            assert served[:2] == [True, True]
            assert 2 <= sum(served) <= 2 + int(2 * elapsed) + 1, (served, elapsed)
            assert streams(gw).stats.connections_refused == served.count(False) > 0
            assert await attempt("127.0.0.6", 99), "another address is not slowed down"

    run(scenario())


def tls_site(ca: Authority, tmp: Path, extra: str = "") -> str:
    gateway = ca.issue("gateway.test")
    return site(
        f'listen_tls = "127.0.0.1:{free_port()}"\n'
        f'tls_certificate = "{gateway.certificate}"\n'
        f'tls_key = "{gateway.key}"\n'
        f'tls_ca = "{ca.bundle}"\n' + extra
    )


def client_context(ca: Authority, issued=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.bundle))
    if issued is not None:
        context.load_cert_chain(issued.certificate, issued.key)
    return context


def test_tls_callers_verified_or_refused_and_counted(tmp_path, caplog):
    ca = Authority(tmp_path / "ca")
    stranger_ca = Authority(tmp_path / "stranger", name="Stranger CA")
    phone = ca.issue("phone.test")
    impostor = stranger_ca.issue("phone.test")  # same name, another CA

    async def scenario() -> None:
        async with running_gateway(tls_site(ca, tmp_path, 'tls_handshake_timeout = "1s"')) as gw:
            port = gw.sip.transport.port_for("tls")
            s = streams(gw).stats

            async def call(context: ssl.SSLContext, cseq: int):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="gateway.test"
                )
                writer.write(options(cseq))
                return await read_message(reader), writer

            # A verified client certificate is the connection's identity.
            answer, writer = await call(client_context(ca, phone), 1)
            assert answer.startswith(b"SIP/2.0 200")
            identities = {c.identity for c in streams(gw).connections.values()}
            assert identities == {"phone.test"}
            writer.close()
            # No client certificate: served, no identity.
            answer, writer = await call(client_context(ca), 2)
            assert answer.startswith(b"SIP/2.0 200")
            await until(
                lambda: {c.identity for c in streams(gw).connections.values()} == {""},
                5,
                "the anonymous caller in the table",
            )
            writer.close()

            # A certificate from another CA: refused, counted, logged once a minute.
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="gateway.sip.tls"):
                for attempt in (1, 2):
                    try:
                        await call(client_context(ca, impostor), 10 + attempt)
                    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
                        pass
                    else:
                        raise AssertionError("a certificate of another CA was accepted")
                    await until(lambda a=attempt: s.handshake_failures == a, 5, "the count")
            lines = [r for r in caplog.records if "handshake" in r.getMessage()]
            assert len(lines) == 1, [r.getMessage() for r in lines]
            assert "127.0.0.1" in lines[0].getMessage()
            assert "certificate" in lines[0].getMessage()

            # Plain SIP to the TLS port, and a peer that never starts the handshake.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(options(20))
            assert await closed_by_peer(reader, 5)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await closed_by_peer(reader, 10), "a silent peer held a handshake open"
            writer.close()
            assert s.handshake_failures == 4
            assert gw.sip.stats()["sip_tls_handshake_failures"] == 4
            assert not streams(gw).pending and not streams(gw).connections

    run(scenario())
