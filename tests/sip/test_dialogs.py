"""Dialog and media hygiene against the running gateway: every call ends by a timer if its
peer goes quiet, no RTP before the ACK, nobody can take over another call's media, calls
from one address are told apart by SSRC, re-INVITEs move media, and header case is free.

The callers here are raw UDP endpoints written in the test (they must do what a phone
would not: never ACK, name someone else's address, inject another SSRC, shout their
header names); two gateways talk to each other with their real SIP stacks.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
from pathlib import Path

import numpy as np
import pytest
from gateway.codecs.g711 import ulaw_decode, ulaw_encode
from sip_peers import band_db, dominant_hz, run, running_gateway
from test_calls import legs, recorded, site
from test_shared_port import HEADER, RATE, RawPhone, stream

from gateway.sip.message import SPELLING
from tests.conftest import free_port
from tests.waiting import until


class Caller(RawPhone):
    """A RawPhone whose INVITE, ACK and re-INVITE the test shapes by hand."""

    def __init__(self, name: str, hz: float) -> None:
        super().__init__(name, hz)
        self.call_id = f"{secrets.token_hex(8)}@127.0.0.1"
        self.cseq = 1
        self.to = ""
        self.gateway: tuple[str, int] | None = None
        self.number = ""
        self.inbox: list[str] = []
        self.packets: list[bytes] = []

    def sdp(self, port: int | None = None, ssrcs: tuple[int, ...] = (), address: str = "") -> str:
        lines = [
            "v=0",
            "o=- 1 1 IN IP4 127.0.0.1",
            "s=-",
            f"c=IN IP4 {address or '127.0.0.1'}",
            "t=0 0",
            f"m=audio {port or self.rtp.getsockname()[1]} RTP/AVP 0 101",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=ptime:20",
            *(f"a=ssrc:{s} cname:{self.name}" for s in ssrcs),
        ]
        return "\r\n".join(lines) + "\r\n"

    def _request(
        self,
        method: str,
        body: str = "",
        content_type: str = "application/sdp",
        names: dict[str, str] | None = None,
    ) -> None:
        n = {**SPELLING, **(names or {})}
        me = self.sip.getsockname()[1]
        assert self.gateway is not None
        lines = [
            f"{method} sip:{self.number}@127.0.0.1:{self.gateway[1]} SIP/2.0",
            f"{n['via']}: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{secrets.token_hex(6)}",
            f"{n['from']}: <sip:{self.name}@127.0.0.1>;tag={self.name}",
            f"{n['to']}: {self.to or f'<sip:{self.number}@127.0.0.1>'}",
            f"{n['call-id']}: {self.call_id}",
            f"{n['cseq']}: {self.cseq} {'INVITE' if method == 'ACK' else method}",
            "Max-Forwards: 70",
            f"{n['contact']}: <sip:{self.name}@127.0.0.1:{me}>",
        ]
        if body:
            lines.append(f"{n['content-type']}: {content_type}")
        lines.append(f"{n['content-length']}: {len(body)}")
        self.sip.sendto(("\r\n".join(lines) + "\r\n\r\n" + body).encode(), self.gateway)

    def receive_sip(self) -> None:
        while True:
            try:
                self.inbox.append(self.sip.recv(65535).decode())
            except BlockingIOError:
                return

    async def final(self, what: str, timeout: float = 5.0) -> str:
        """The next final response to our request with the current CSeq."""

        def find() -> str | None:
            self.receive_sip()
            for text in self.inbox:
                status = re.match(r"SIP/2.0 (\d+)", text)
                cseq = re.search(r"^CSeq\s*:\s*(\d+)", text, re.M | re.I)
                if status and int(status[1]) >= 200 and cseq and int(cseq[1]) == self.cseq:
                    self.inbox.remove(text)
                    return text
            return None

        return await until(find, timeout, what)

    async def invite(
        self, gateway_port: int, number: str, body: str | None = None, ack: bool = True, **request
    ) -> str:
        self.gateway = ("127.0.0.1", gateway_port)
        self.number = number
        self._request("INVITE", self.sdp() if body is None else body, **request)
        text = await self.final(f"{self.name}'s INVITE to be answered")
        if text.startswith("SIP/2.0 200"):
            self.to = re.search(r"^(?:To|t)\s*:(.+)$", text, re.M | re.I)[1].strip()
            match = re.search(r"^m=audio (\d+)", text, re.M)
            self.remote = ("127.0.0.1", int(match[1]))
            if ack:
                self.ack()
        return text

    def ack(self) -> None:
        self._request("ACK")

    async def reinvite(self, body: str) -> str:
        self.cseq += 1
        self._request("INVITE", body)
        text = await self.final(f"{self.name}'s re-INVITE to be answered")
        if text.startswith("SIP/2.0 200"):
            self.ack()
        return text

    def bye_received(self) -> bool:
        """True once the gateway sent BYE (answered 200, as a phone would)."""
        self.receive_sip()
        for text in self.inbox:
            if text.startswith("BYE "):
                reply = re.sub(r"^BYE [^\r]+", "SIP/2.0 200 OK", text.split("\r\n\r\n")[0])
                self.sip.sendto((reply + "\r\n\r\n").encode(), self.gateway)
                return True
        return False

    def drain(self) -> None:
        """Every RTP packet queued on our RTP socket, kept whole and as audio in ``heard``."""
        while True:
            try:
                data = self.rtp.recv(2048)
            except BlockingIOError:
                return
            self.packets.append(data)
            if len(data) > 12 and data[1] & 0x7F == 0:
                self.heard.append(data[12:])

    def rtp_packets(self) -> list[bytes]:
        """The RTP packets received since the last call."""
        self.drain()
        packets, self.packets = self.packets, []
        return packets


def timers(tmp_path: Path, ack: str = "32s", media: str = "60s") -> str:
    """The test site with [sip] timers short enough for a test."""
    return site(tmp_path, None).replace(
        'rtp_ports = "20000-31999"',
        f'rtp_ports = "20000-31999"\nack_timeout = "{ack}"\nmedia_timeout = "{media}"\n'
        'rtcp_interval = "1s"',
    )


def test_never_acked_invite_sends_no_rtp_and_is_ended_with_bye(tmp_path):
    silent = Caller("noack", 600)
    good = Caller("acks", 900)

    async def scenario() -> None:
        async with running_gateway(timers(tmp_path, ack="2s")) as gw:
            port = gw.sip.port
            await good.invite(port, "6001")  # the control: an ACKed call gets the radio
            answer = await silent.invite(port, "6001", ack=False)
            assert answer.startswith("SIP/2.0 200")
            assert len(legs(gw)) == 2
            # Until the (never sent) ACK, nothing goes to the address its SDP named.
            got: list[bytes] = []
            await until(lambda: good.rtp_packets() and len(good.heard) >= 25, 5, "control RTP")
            got += silent.rtp_packets()
            assert got == [], f"{len(got)} RTP packets sent to a call that never ACKed"
            await until(silent.bye_received, 10, "BYE to the call never ACKed (Timer H)")
            got += silent.rtp_packets()
            assert got == [], f"{len(got)} RTP packets sent to a call that never ACKed"
            assert gw.sip.calls.timed_out["ack"] == 1
            assert [d.call_id for d in gw.sip.calls.dialogs.values()] == [good.call_id]

    try:
        run(scenario())
    finally:
        silent.close()
        good.close()


def test_a_call_that_stops_sending_media_is_ended_with_bye(tmp_path):
    talker = Caller("talker", 600)
    mute = Caller("mute", 900)

    async def scenario() -> None:
        async with running_gateway(timers(tmp_path, media="2s")) as gw:
            for caller in (talker, mute):
                await caller.invite(gw.sip.port, "7001")
            await stream([talker, mute], 1.0)  # both send, then only the talker goes on
            loop = asyncio.get_running_loop()
            stopped = loop.time()
            while not mute.bye_received():
                assert loop.time() - stopped < 10, "no BYE to the call whose media stopped"
                await stream([talker], 0.2)
            assert loop.time() - stopped >= 1.5  # media_timeout is 2s (sweep: 0.5 s)
            assert gw.sip.calls.timed_out == {"ack": 0, "media": 1}
            assert [d.call_id for d in gw.sip.calls.dialogs.values()] == [talker.call_id]
            assert not talker.bye_received()

    try:
        run(scenario())
    finally:
        talker.close()
        mute.close()


def test_a_call_naming_another_callers_media_address_is_refused(tmp_path):
    victim = Caller("victim", 600)
    thief = Caller("thief", 900)

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, None)) as gw:
            await victim.invite(gw.sip.port, "6001")  # hears the radio's 1 kHz
            victim_port = victim.rtp.getsockname()[1]
            refused = await thief.invite(gw.sip.port, "7001", body=thief.sdp(port=victim_port))
            assert refused.startswith("SIP/2.0 488"), refused
            # ... also when it claims an SSRC: the victim announced none to tell them apart.
            thief.call_id += "x"
            refused = await thief.invite(
                gw.sip.port, "7001", body=thief.sdp(port=victim_port, ssrcs=(1234,))
            )
            assert refused.startswith("SIP/2.0 488"), refused
            thief.call_id += "y"  # the gateway's own media port: a loop, refused too
            refused = await thief.invite(gw.sip.port, "7001", body=thief.sdp(port=gw.sip.bank.port))
            assert refused.startswith("SIP/2.0 488"), refused
            assert len(legs(gw)) == 1
            victim.rtp_packets()
            victim.heard.clear()
            await stream([victim], 1.0)
            packets = victim.rtp_packets()
            ssrcs = {int.from_bytes(p[8:12], "big") for p in packets}
            assert len(ssrcs) == 1 and 40 <= len(packets) <= 60, (len(ssrcs), len(packets))
            heard = victim.audio(0.8)
            assert abs(dominant_hz(heard, RATE) - 1000) < 20
            assert band_db(heard, RATE, 1000) == pytest.approx(-12, abs=2)

    try:
        run(scenario())
    finally:
        victim.close()
        thief.close()


def test_packets_with_another_ssrc_from_a_callers_address_are_not_heard(tmp_path):
    alpha = Caller("alpha", 600)
    bravo = Caller("bravo", 900)

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, None)) as gw:
            for caller in (alpha, bravo):
                await caller.invite(gw.sip.port, "7001")
            await stream([alpha, bravo], 0.5)  # alpha's SSRC is locked on its first packet
            bank = gw.sip.bank
            before = bank.table.malformed.get("ssrc", 0)
            injected = secrets.randbits(32)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for k in range(75):  # 1.5 s: alpha's 600 Hz and, from its own address, 1400 Hz
                alpha.send_frame()
                t = (k * 160 + np.arange(160)) / RATE
                pcm = (0.3 * 32767 * np.sin(2 * np.pi * 1400 * t)).astype(np.int16)
                header = HEADER.pack(0x80, 0, k, k * 160, injected)
                alpha.rtp.sendto(header + ulaw_encode(pcm).tobytes(), alpha.remote)
                bravo.send_frame()
                bravo.rtp_packets()
                await asyncio.sleep(max(0.0, start + (k + 1) * 0.02 - loop.time()))
            heard = bravo.audio(1.0)
            assert band_db(heard, RATE, 600) > -20, "alpha's own voice lost"
            assert band_db(heard, RATE, 1400) < band_db(heard, RATE, 600) - 35, "injected"
            assert bank.table.malformed["ssrc"] - before >= 70
            # RFC 3550: once alpha's SSRC has been silent a while, a new one is alpha's.
            await asyncio.sleep(1.2)  # alpha says nothing for longer than SSRC_HANDOVER
            alpha.ssrc = injected ^ 0xFFFF
            bravo.heard.clear()
            await stream([alpha, bravo], 1.0)
            assert band_db(bravo.audio(0.6), RATE, 600) > -20, "alpha's new stream refused"

    try:
        run(scenario())
    finally:
        alpha.close()
        bravo.close()


def two_sites(tmp_path: Path, dialogs: int) -> tuple[str, str]:
    """Site A dials site B once per talkgroup: A's tg_k (a radio at its own tone) → B's 800k."""
    tones = [1000, 500, 700][:dialogs]
    port_b = free_port()
    a = ['[site]\nname = "site-a"\ncountry = "CA"\n']
    b = ['[site]\nname = "site-b"\ncountry = "US"\n']
    for k, hz in enumerate(tones, 1):
        a.append(f"""
[ports.radio{k}]
kind = "simulated_radio"
tone_hz = {hz}
talk_every = "0s"
talk_for = "0s"
level_dbfs = -12.0

[talkgroups.ta{k}]
members = ["radio{k}"]
""")
        b.append(f"""
[ports.rec{k}]
kind = "recorder"
directory = "{tmp_path / f"tg{k}"}"
continuous = true

[talkgroups.tg{k}]
members = ["rec{k}"]
""")
    a.append(f'[sip]\nlisten = "127.0.0.1:{free_port()}"\nrtp_ports = "20000-31999"\n')
    b.append(f'[sip]\nlisten = "127.0.0.1:{port_b}"\nrtp_ports = "20000-31999"\n')
    for k in range(1, dialogs + 1):
        a.append(
            f'[sip.dial_out.d{k}]\ntalkgroup = "ta{k}"\nuri = "sip:800{k}@127.0.0.1:{port_b}"\n'
        )
        b.append(f'[sip.routes."800{k}"]\ntalkgroup = "tg{k}"\npublic = true\n')
    return "\n".join(a), "\n".join(b)


@pytest.mark.parametrize("dialogs", [2, 3])
def test_dialogs_between_two_gateways_each_carry_only_their_own_talkgroup(tmp_path, dialogs):
    toml_a, toml_b = two_sites(tmp_path, dialogs)
    tones = [1000, 500, 700][:dialogs]

    async def scenario() -> None:
        async with running_gateway(toml_b) as b, running_gateway(toml_a):
            await until(lambda: len(legs(b)) == dialogs, 10, "every dial-out answered")
            # Each side sends every call from its one RTP port: B hears all from one address.
            assert len({int(b.sip.bank.table.dest[leg.row]) for leg in legs(b)}) == 1
            await until(
                lambda: sum(leg.stats()["packets_in"] for leg in legs(b)) >= 150 * dialogs,
                15,
                "3 s of audio per call",
            )
            assert b.sip.bank.table.malformed.get("ssrc", 0) == 0

    run(scenario())
    for k, hz in enumerate(tones, 1):
        heard = recorded(tmp_path / f"tg{k}")[-16000:]
        own = band_db(heard, 16000, hz)
        assert abs(dominant_hz(heard, 16000) - hz) < 20, f"tg{k} carries the wrong tone"
        assert own == pytest.approx(-12, abs=2.5), f"tg{k}: its own tone at {own:.1f} dBFS"
        for other in tones:
            if other != hz:
                leak = band_db(heard, 16000, other)
                # (the bug put the wrong talkgroup 19 dB below full scale; G.711's own
                # harmonics, aliased, land about 40 dB below a tone: tones are chosen apart).
                # A frame concealed on a loaded machine splatters the own tone over the
                # neighbourhood: a leak is a tone that stands out of it, not broadband noise.
                floor = max(band_db(heard, 16000, other + d) for d in (-120, 120))
                assert leak < own - 35 or leak < floor + 10, (
                    f"tg{k} hears {other} Hz at {leak:.1f} dBFS (beside it {floor:.1f})"
                )


def test_upper_case_content_type_and_header_names_are_answered(tmp_path):
    caller = Caller("shouty", 600)
    shouted = {
        "call-id": "CALL-ID",
        "cseq": "cseq",
        "from": "FROM",
        "to": "tO",
        "via": "v",
        "content-type": "CONTENT-TYPE",
        "content-length": "l",
    }

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, None)) as gw:
            answer = await caller.invite(
                gw.sip.port,
                "6001",
                content_type="APPLICATION/SDP; charset=utf-8",
                names=shouted,
            )
            assert answer.startswith("SIP/2.0 200"), answer
            assert gw.sip.transport.stats.errors == 0
            await stream([caller], 1.0)
            heard = caller.audio(0.8)
            assert abs(dominant_hz(heard, RATE) - 1000) < 20

    try:
        run(scenario())
    finally:
        caller.close()


def test_re_invite_moves_media_or_is_refused_never_half_applied(tmp_path):
    phone = Caller("mover", 600)
    other = Caller("other", 900)
    new_rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    new_rtp.bind(("127.0.0.1", 0))
    new_rtp.setblocking(False)

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, None)) as gw:
            first = await phone.invite(gw.sip.port, "6001")
            await other.invite(gw.sip.port, "7001")
            # Same media again: the same answer.
            same = await phone.reinvite(phone.sdp())
            assert same.split("\r\n\r\n")[1] == first.split("\r\n\r\n")[1]
            # Another call's address: refused, and the call stays where it was.
            taken = await phone.reinvite(phone.sdp(port=other.rtp.getsockname()[1]))
            assert taken.startswith("SIP/2.0 488")
            phone.rtp_packets()
            phone.heard.clear()
            await stream([phone, other], 0.6)
            assert abs(dominant_hz(phone.audio(0.4), RATE) - 1000) < 20
            # Every packet the phone sent from its old port taken in first (a busy media
            # thread could still read one after the move and latch the call back there).
            leg = gw.sip.calls.dialogs[phone.call_id].leg
            await until(lambda: leg.stats()["packets_in"] >= 30, 10, "the phone's RTP taken in")
            # A new port: the radio's tone goes there, and nothing to the old one.
            moved = await phone.reinvite(phone.sdp(port=new_rtp.getsockname()[1]))
            assert moved.startswith("SIP/2.0 200")
            assert (
                re.search(r"^o=\S+ \d+ (\d+)", moved, re.M)[1]
                != re.search(r"^o=\S+ \d+ (\d+)", first, re.M)[1]
            ), "the SDP version goes up when the media changes"
            heard: list[bytes] = []

            def enough() -> bool:
                while True:
                    try:
                        data = new_rtp.recv(2048)
                    except BlockingIOError:
                        return len(heard) >= 40
                    heard.append(data[12:])

            await until(enough, 5, "RTP at the new port")
            codes = np.frombuffer(b"".join(heard[-40:]), np.uint8)
            audio = ulaw_decode(codes).astype(np.float32) / 32768
            assert abs(dominant_hz(audio, RATE) - 1000) < 20
            phone.rtp_packets()
            await asyncio.sleep(0.2)
            assert phone.rtp_packets() == [], "RTP still goes to the old port"

    try:
        run(scenario())
    finally:
        phone.close()
        other.close()
        new_rtp.close()


def test_a_caller_using_compact_header_names_gets_a_bye_that_names_its_dialog(tmp_path):
    """``f:``/``t:``/``m:`` are From/To/Contact (RFC 3261 §7.3.3): the dialog keeps the
    caller's URI and Contact, so the gateway's BYE goes to the Contact with the caller's
    URI and tag in To (it once wrote ``To: ;tag=…`` to the Request-URI's user)."""
    caller = Caller("terse", 600)
    compact = {"from": "f", "to": "t", "contact": "m", "call-id": "i", "via": "v"}

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, None)) as gw:
            answer = await caller.invite(gw.sip.port, "6001", names=compact)
            assert answer.startswith("SIP/2.0 200"), answer
            dialog = gw.sip.calls.dialogs[caller.call_id]
            await gw.sip.calls.hangup(dialog, wait=0.5)
            await until(caller.bye_received, 5, "the gateway's BYE")
            bye = next(text for text in caller.inbox if text.startswith("BYE "))
            me = caller.sip.getsockname()[1]
            assert bye.startswith(f"BYE sip:terse@127.0.0.1:{me} SIP/2.0"), bye
            assert re.search(r"^To: <sip:terse@127.0.0.1>;tag=terse\r?$", bye, re.M), bye
            assert re.search(r"^From: <sip:6001@127.0.0.1>;tag=\w+\r?$", bye, re.M), bye
            assert gw.sip.transport.stats.errors == 0

    try:
        run(scenario())
    finally:
        caller.close()
