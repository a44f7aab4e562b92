"""Every call's RTP on one shared port: demultiplexed by source address, latched behind NAT,
junk counted on the right call, SSRC changes followed — against the running gateway.

The phones here are raw RTP endpoints in the test (INVITE/ACK over UDP, G.711 packets
paced at 20 ms), because baresip cannot send from a port other than its SDP's or
inject malformed packets; the gateway side is the real one (engine, clock, SIP).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import struct

import numpy as np
from gateway.codecs.g711 import ulaw_decode, ulaw_encode
from sip_peers import band_db, run, running_gateway
from test_calls import site

from tests.waiting import until

RATE = 8000
HEADER = struct.Struct("!BBHII")


class RawPhone:
    """A minimal UAC: one call, a tone as µ-law RTP, and a record of the µ-law it receives."""

    def __init__(self, name: str, hz: float, behind_nat: bool = False) -> None:
        self.name = name
        self.hz = hz
        self.sip = self._socket()
        self.rtp, self.rtcp = self._pair()
        # Behind NAT the SDP names a port the packets do not come from.
        self.announced = self._socket() if behind_nat else self.rtp
        self.remote: tuple[str, int] | None = None
        self.ssrc = secrets.randbits(32)
        self.seq = secrets.randbits(16)
        self.ts = secrets.randbits(32)
        self.phase = 0
        self.heard: list[bytes] = []

    @classmethod
    def _pair(cls) -> tuple[socket.socket, socket.socket]:
        """An RTP socket on an even port and its RTCP socket on the next one."""
        for _ in range(50):
            rtp = cls._socket()
            port = rtp.getsockname()[1]
            if port % 2 == 0:
                try:
                    rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    rtcp.bind(("127.0.0.1", port + 1))
                    rtcp.setblocking(False)
                    return rtp, rtcp
                except OSError:
                    rtcp.close()
            rtp.close()
        raise RuntimeError("no free RTP/RTCP port pair")

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        return sock

    async def call(self, gateway_port: int, number: str) -> None:
        me = self.sip.getsockname()[1]
        call_id = self.call_id = f"{secrets.token_hex(8)}@127.0.0.1"
        body = (
            f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {self.announced.getsockname()[1]} RTP/AVP 0 101\r\n"
            "a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=ptime:20\r\n"
        )
        common = (
            f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
            f"From: <sip:{self.name}@127.0.0.1>;tag={self.name}\r\n"
            f"Call-ID: {call_id}\r\nMax-Forwards: 70\r\n"
        )
        gateway = ("127.0.0.1", gateway_port)
        self.sip.sendto(
            (
                f"INVITE sip:{number}@127.0.0.1:{gateway_port} SIP/2.0\r\n{common}"
                f"To: <sip:{number}@127.0.0.1>\r\nCSeq: 1 INVITE\r\n"
                f"Contact: <sip:{self.name}@127.0.0.1:{me}>\r\n"
                f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            ).encode(),
            gateway,
        )

        def answer() -> str | None:
            try:
                text = self.sip.recv(65535).decode()
            except BlockingIOError:
                return None
            return text if text.startswith("SIP/2.0 200") else None

        text = await until(answer, 5, f"{self.name}'s call to be answered")
        self.remote = ("127.0.0.1", int(re.search(r"^m=audio (\d+)", text, re.M).group(1)))
        to = re.search(r"^To: (.+)$", text, re.M).group(1).strip()
        self.sip.sendto(
            (
                f"ACK sip:{number}@127.0.0.1:{gateway_port} SIP/2.0\r\n{common}"
                f"To: {to}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
            ).encode(),
            gateway,
        )

    def send_frame(self, skip: bool = False) -> None:
        """The next 20 ms; ``skip`` loses it on the way (sequence and time still advance)."""
        t = (self.phase + np.arange(160)) / RATE
        self.phase += 160
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * self.hz * t)).astype(np.int16)
        header = HEADER.pack(0x80, 0, self.seq & 0xFFFF, self.ts & 0xFFFFFFFF, self.ssrc)
        if not skip:
            self.rtp.sendto(header + ulaw_encode(pcm).tobytes(), self.remote)
        self.seq += 1
        self.ts += 160

    def drain(self) -> None:
        while True:
            try:
                data = self.rtp.recv(2048)
            except BlockingIOError:
                return
            if len(data) > 12 and data[1] & 0x7F == 0:
                self.heard.append(data[12:])

    def audio(self, last_seconds: float) -> np.ndarray:
        codes = np.frombuffer(b"".join(self.heard), np.uint8)
        return ulaw_decode(codes[-int(last_seconds * RATE) :]).astype(np.float32) / 32768

    def close(self) -> None:
        for sock in {self.sip, self.rtp, self.rtcp, self.announced}:
            sock.close()


async def stream(phones: list[RawPhone], seconds: float) -> None:
    """Every phone sends a packet every 20 ms (a traffic source, paced like a phone)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for k in range(int(seconds / 0.02)):
        for phone in phones:
            phone.send_frame()
            phone.drain()
        await asyncio.sleep(max(0.0, start + (k + 1) * 0.02 - loop.time()))


def test_calls_share_one_port_are_told_apart_latched_and_junk_lands_on_its_call(tmp_path):
    alpha = RawPhone("alpha", 600)
    bravo = RawPhone("bravo", 900)
    nat = RawPhone("natted", 1300, behind_nat=True)
    phones = [alpha, bravo, nat]

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, None)) as gw:
            port = gw.sip.port
            for phone in phones:
                await phone.call(port, "7001")
            bank = gw.sip.bank
            assert {p.remote[1] for p in phones} == {bank.port}, "one media port for all calls"
            await stream(phones, 2.0)
            # Leg names carry no caller name (privacy): find each phone's leg by its call.
            dialogs = gw.sip.calls.dialogs
            by_name = {p.name: dialogs[p.call_id].leg for p in phones if p.call_id in dialogs}
            assert set(by_name) == {"alpha", "bravo", "natted"}
            for name in ("alpha", "bravo", "natted"):
                assert by_name[name].stats()["packets_in"] >= 80, name
            # Each hears the other two, never itself; the NAT phone hears at its real port.
            # "Never itself" is judged against what it does hear: its own tone sent back would
            # be as loud as the others (0 dB), while a late packet concealed under CI load
            # splashes a little of the others' energy into every band (measured -42 dBFS
            # against -14 dBFS, so an absolute floor was flaky).
            for phone in phones:
                heard = phone.audio(1.0)
                own = band_db(heard, RATE, phone.hz)
                for other in phones:
                    if other is not phone:
                        level = band_db(heard, RATE, other.hz)
                        assert level > -25, f"{phone.name} does not hear {other.name}"
                        assert own < level - 20, f"{phone.name} hears itself ({own:.1f} dBFS)"
            # Junk from alpha's own address is alpha's: counted on its leg, by kind.
            before = dict(bank.table.malformed)
            good = HEADER.pack(0x80, 0, 1, 160, alpha.ssrc)
            for junk in (
                bytes([0x80, 99]) + good[2:] + bytes(160),  # a payload type never agreed
                bytes([0x40]) + good[1:] + bytes(160),  # RTP version 1
                good[:8],  # truncated
                bytes([0xA0]) + good[1:] + bytes([0, 0, 0, 200]),  # padding past the end
            ):
                alpha.rtp.sendto(junk, alpha.remote)
            await until(
                lambda: by_name["alpha"].stats()["packets_malformed"] == 4, 3, "junk counted"
            )
            counted = {k: v - before[k] for k, v in bank.table.malformed.items() if v != before[k]}
            assert counted == {"payload_type": 1, "version": 1, "truncated": 1, "layout": 1}
            assert by_name["bravo"].stats()["packets_malformed"] == 0
            # alpha restarts its stream with a new SSRC and sequence: followed once the old
            # SSRC has been silent for SSRC_HANDOVER (1 s; RFC 3550 — see gateway.sip.bank).
            lost_before = by_name["alpha"].stats()["packets_lost"]
            alpha.ssrc, alpha.seq, alpha.ts = alpha.ssrc ^ 0x5A5A5A5A, 7, 123456
            for phone in phones:
                phone.heard.clear()
            await stream(phones, 2.0)
            assert band_db(bravo.audio(0.8), RATE, 600) > -25, "alpha lost after its SSRC change"
            assert band_db(nat.audio(0.8), RATE, 600) > -25, "the NAT phone lost alpha"
            assert by_name["alpha"].stats()["packets_lost"] - lost_before <= 1

    try:
        run(scenario())
    finally:
        for phone in phones:
            phone.close()
