"""The impairment relay does what it says, judged by counts and lower bounds.

Delays are checked as "never earlier than configured" (the relay cannot beat its
own timer) with a generous ceiling, and loss/reordering by counts of a seeded
generator, so a busy 2-core machine cannot make these tests flaky.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest
from relay import Impairment, TcpRelay, UdpRelay

from tests.waiting import until

PACKET = struct.Struct("!Id")  # sequence, send time (monotonic)
SLACK = 0.002  # the event loop may run a timer this much early
CEILING = 0.5  # a delay this much over the configured one means the relay is broken


class Sink(asyncio.DatagramProtocol):
    """The target: records (sequence, one-way delay, source) and can echo."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.got: list[tuple[int, float, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        seq, sent = PACKET.unpack(data)
        self.got.append((seq, time.monotonic() - sent, addr))
        if self.echo and self.transport is not None:
            self.transport.sendto(data, addr)

    @property
    def sequence(self) -> list[int]:
        return [seq for seq, _, _ in self.got]

    @property
    def delays(self) -> list[float]:
        return [delay for _, delay, _ in self.got]


async def endpoint(echo: bool = False) -> tuple[asyncio.DatagramTransport, Sink, int]:
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(
        lambda: Sink(echo), local_addr=("127.0.0.1", 0)
    )
    return transport, sink, transport.get_extra_info("sockname")[1]


async def train(to: int, count: int, first: int = 0, sender: socket.socket | None = None) -> None:
    """``count`` datagrams, 1 ms apart (paced so no socket buffer overflows)."""
    own = sender is None
    sock = sender or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for seq in range(first, first + count):
            sock.sendto(PACKET.pack(seq, time.monotonic()), ("127.0.0.1", to))
            await asyncio.sleep(0.001)
    finally:
        if own:
            sock.close()


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def test_udp_delay_and_loss_show_in_the_counts() -> None:
    async def main() -> None:
        transport, sink, port = await endpoint()
        async with UdpRelay(("127.0.0.1", port), Impairment(delay=0.05, loss=0.2), seed=7) as relay:
            await train(relay.port, 500)
            await until(
                lambda: (
                    relay.up.lost + relay.up.forwarded == 500 == relay.up.received
                    and len(sink.got) == relay.up.forwarded
                ),
                20,
                "the train to be forwarded or dropped",
            )
            assert 60 <= relay.up.lost <= 140  # 20 % of 500 is 100; binomial sd ≈ 9
            assert len(sink.got) == 500 - relay.up.lost
            assert min(sink.delays) >= 0.05 - SLACK
            assert median(sink.delays) <= 0.05 + CEILING
            assert sink.sequence == sorted(sink.sequence)  # no jitter: no reordering
        transport.close()

    asyncio.run(main())


def test_udp_jitter_and_reordering_let_later_packets_overtake() -> None:
    async def main() -> None:
        transport, sink, port = await endpoint()
        impair = Impairment(delay=0.03, jitter=0.01, reorder=0.1, reorder_by=0.05)
        async with UdpRelay(("127.0.0.1", port), impair, seed=3) as relay:
            await train(relay.port, 300)
            await until(lambda: len(sink.got) == 300, 20, "all 300 packets")
            assert 10 <= relay.up.reordered <= 60  # 10 % of 300
            overtaken = sum(
                1 for a, b in zip(sink.sequence, sink.sequence[1:], strict=False) if b < a
            )
            assert overtaken >= relay.up.reordered // 2
            assert sorted(sink.sequence) == list(range(300)) and relay.up.lost == 0
            assert min(sink.delays) >= 0.03 - 0.01 - SLACK
        transport.close()

    asyncio.run(main())


def test_udp_blackout_drops_until_resumed_and_changes_apply_live() -> None:
    async def main() -> None:
        transport, sink, port = await endpoint()
        async with UdpRelay(("127.0.0.1", port), Impairment(delay=0.01)) as relay:
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await train(relay.port, 50, 0, sender)
            await until(lambda: len(sink.got) == 50, 20, "packets before the blackout")
            relay.blackout()
            await train(relay.port, 50, 100, sender)
            await until(lambda: relay.up.received == 100, 20, "the relay to see the blackout")
            assert relay.up.blacked_out == 50 and len(sink.got) == 50
            relay.resume()
            relay.impair.loss = 1.0  # live: everything lost now
            await train(relay.port, 20, 200, sender)
            await until(lambda: relay.up.received == 120, 20, "lost packets")
            assert relay.up.lost == 20
            relay.impair = Impairment(delay=0.02)
            await train(relay.port, 30, 300, sender)
            await until(lambda: len(sink.got) == 80, 20, "packets after the changes")
            assert sink.sequence == [*range(50), *range(300, 330)]
            assert min(sink.delays[50:]) >= 0.02 - SLACK
            sender.close()
        transport.close()

    asyncio.run(main())


def test_udp_replies_come_back_to_each_client_through_the_return_impairment() -> None:
    async def main() -> None:
        transport, echo, port = await endpoint(echo=True)
        a_transport, a, _ = await endpoint()
        b_transport, b, _ = await endpoint()
        relay = UdpRelay(("127.0.0.1", port), Impairment(delay=0.01), back=Impairment(delay=0.04))
        async with relay:
            for seq in range(20):
                a_transport.sendto(PACKET.pack(seq, time.monotonic()), ("127.0.0.1", relay.port))
                b_transport.sendto(
                    PACKET.pack(100 + seq, time.monotonic()), ("127.0.0.1", relay.port)
                )
                await asyncio.sleep(0.001)
            await until(lambda: len(a.got) == 20 and len(b.got) == 20, 20, "the echoes")
            assert a.sequence == list(range(20)) and b.sequence == list(range(100, 120))
            assert min(a.delays + b.delays) >= 0.01 + 0.04 - SLACK  # round trip
            assert min(echo.delays) >= 0.01 - SLACK
            assert len({source for _, _, source in echo.got}) == 2  # one upstream per client
            assert relay.down.forwarded == 40
        for t in (transport, a_transport, b_transport):
            t.close()

    asyncio.run(main())


async def echo_server() -> tuple[asyncio.Server, int, list[int]]:
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


def test_tcp_keeps_the_byte_order_under_jitter_and_adds_the_delay() -> None:
    async def main() -> None:
        server, port, _ = await echo_server()
        async with TcpRelay(("127.0.0.1", port), Impairment(delay=0.03, jitter=0.02)) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            sent = b"".join(f"chunk {i:04d};".encode() for i in range(300))
            for i in range(300):
                writer.write(f"chunk {i:04d};".encode())
                await asyncio.sleep(0.001)
            echoed = await asyncio.wait_for(reader.readexactly(len(sent)), 30)
            assert echoed == sent
            relay.impair = Impairment(delay=0.05)
            started = time.monotonic()
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 30) == b"ping"
            assert time.monotonic() - started >= 2 * 0.05 - SLACK
            writer.close()
        server.close()

    asyncio.run(main())


def test_tcp_blackout_holds_data_and_new_connections_until_resumed() -> None:
    async def main() -> None:
        server, port, accepted = await echo_server()
        async with TcpRelay(("127.0.0.1", port)) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"before")
            assert await asyncio.wait_for(reader.readexactly(6), 30) == b"before"
            relay.blackout()
            writer.write(b"during")
            late_reader, late_writer = await asyncio.open_connection("127.0.0.1", relay.port)
            late_writer.write(b"late")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(6), 0.3)
            assert relay.accepted == 2 and len(accepted) == 1  # the new one waits
            relay.resume()
            assert await asyncio.wait_for(reader.readexactly(6), 30) == b"during"
            assert await asyncio.wait_for(late_reader.readexactly(4), 30) == b"late"
            assert len(accepted) == 2
            relay.drop_connections()  # the peer died
            assert await asyncio.wait_for(reader.read(10), 30) == b""
            for w in (writer, late_writer):
                w.close()
        server.close()

    asyncio.run(main())


def test_the_relay_stops_by_itself_and_only_talks_to_loopback() -> None:
    async def main() -> None:
        transport, sink, port = await endpoint()
        relay = await UdpRelay(("127.0.0.1", port), lifetime=0.3).start()
        await asyncio.wait_for(relay.stopped.wait(), 10)
        await train(relay.port, 5)
        assert relay.up.received == 0 and not sink.got
        transport.close()
        server, tcp_port, _ = await echo_server()
        tcp = await TcpRelay(("127.0.0.1", tcp_port), lifetime=0.3).start()
        await asyncio.wait_for(tcp.stopped.wait(), 10)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", tcp.port)
        server.close()

    asyncio.run(main())
    with pytest.raises(ValueError, match="loopback"):
        UdpRelay(("192.0.2.1", 5061))
    with pytest.raises(ValueError, match="loopback"):
        TcpRelay(("127.0.0.1", 5061), listen=("0.0.0.0", 0))
