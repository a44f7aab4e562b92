"""SRTP for SIP calls: SDES keys in SDP, only over TLS, per-route policy; the leg bank
protects and checks every packet of an SRTP call, and drops (and counts) what fails.

On the bank and in the gateway the far end is a Python SRTP peer (pylibsrtp, the same C
library but its own sessions and keys) on real sockets: it encrypts a tone in, decrypts
what comes back, and keeps the bytes it saw on the wire to show they are not the G.711
of the tone. Policy is checked with real INVITEs over UDP from a raw socket and over a
real TLS connection; then baresip's SDES module (srtp-mand) calls over TLS and is
called by a sips: dial-out, with the RTP captured on loopback by tshark.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gateway.codecs.g711 import ulaw_decode, ulaw_encode
from pylibsrtp import Policy, Session
from sip_peers import Phone, band_db, dominant_hz, run, running_gateway, stop_process, tone
from test_calls import legs, recorded

from gateway.config import ConfigError, parse_config
from gateway.demo.pki import Authority
from gateway.sip.bank import LegBank
from gateway.sip.config import strictest
from gateway.sip.legmedia import LegMedia
from gateway.sip.message import Source, parse
from gateway.sip.rtcp import RtcpState, build_report, parse_compound
from gateway.sip.sdp import read_offer
from gateway.sip.srtp import SUITE, TAG, Crypto, LegSrtp, accept_keys, new_crypto, parse_crypto
from tests.conftest import free_port, require_binary
from tests.waiting import until, wait_for

RATE = 8000
HEADER = struct.Struct("!BBHII")


def ulaw_tone(hz: float, start: int, level: float = 0.3) -> bytes:
    t = (start + np.arange(160)) / RATE
    return ulaw_encode((level * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)).tobytes()


def tone_share(x: np.ndarray, rate: int, hz: float) -> float:
    """How much of the signal's power is the tone (dB): about 0 for the tone itself; for
    the same bytes encrypted (noise over the whole band), the band's slice, about -17."""
    return band_db(x, rate, hz) - 10 * float(np.log10(np.mean(x.astype(np.float64) ** 2)))


def decode(payloads: list[bytes]) -> np.ndarray:
    return ulaw_decode(np.frombuffer(b"".join(payloads), np.uint8)).astype(np.float32) / 32768


class SrtpPeer:
    """A phone's media end with its own SRTP sessions: sends a tone, keeps what it receives."""

    def __init__(self, hz: float, srtp: bool = True) -> None:
        self.hz = hz
        self.rtp, self.rtcp = self._pair()
        self.address = self.rtp.getsockname()
        self.ours = new_crypto(1)  # the key this peer sends with (its SDP's a=crypto)
        self.theirs: Crypto | None = None  # the gateway's key (its answer's a=crypto)
        self.tx = Session(Policy(self.ours.key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
        self.rx: Session | None = None
        self.srtp = srtp
        self.ssrc = secrets.randbits(32)
        self.seq = secrets.randbits(16)
        self.ts = secrets.randbits(32)
        self.sent = 0
        self.wire: list[bytes] = []  # every RTP datagram as it arrived
        self.rtcp_wire: list[bytes] = []
        self.history: list[bytes] = []  # packets we sent (for replays)

    @staticmethod
    def _pair() -> tuple[socket.socket, socket.socket]:
        for _ in range(50):
            rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rtp.bind(("127.0.0.1", 0))
            port = rtp.getsockname()[1]
            if port % 2 == 0:
                rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    rtcp.bind(("127.0.0.1", port + 1))
                except OSError:
                    rtcp.close()
                    rtp.close()
                    continue
                rtp.setblocking(False)
                rtcp.setblocking(False)
                return rtp, rtcp
            rtp.close()
        raise RuntimeError("no free RTP/RTCP port pair")

    def keys(self, theirs: Crypto) -> None:
        self.theirs = theirs
        self.rx = Session(Policy(theirs.key, ssrc_type=Policy.SSRC_ANY_INBOUND))

    def packet(self) -> bytes:
        """The next 20 ms of tone as an RTP packet, SRTP-protected if this peer does SRTP."""
        data = HEADER.pack(0x80, 0, self.seq & 0xFFFF, self.ts & 0xFFFFFFFF, self.ssrc)
        data += ulaw_tone(self.hz, self.sent * 160)
        self.seq += 1
        self.ts += 160
        self.sent += 1
        return self.tx.protect(data) if self.srtp else data

    def send(self, to: tuple[str, int]) -> None:
        data = self.packet()
        self.history.append(data)
        self.rtp.sendto(data, to)

    def drain(self) -> None:
        for sock, into in ((self.rtp, self.wire), (self.rtcp, self.rtcp_wire)):
            while True:
                try:
                    into.append(sock.recv(2048))
                except BlockingIOError:
                    break

    def heard(self, last: int = 50) -> np.ndarray:
        """What we received, decrypted with the gateway's key, decoded (the last packets)."""
        assert self.rx is not None
        return decode([self.rx.unprotect(p)[12:] for p in self.wire[-last:]])

    def wire_audio(self, last: int = 50) -> np.ndarray:
        """The bytes on the wire where G.711 would be, decoded as if they were."""
        return decode([p[12 : 12 + 160] for p in self.wire[-last:]])

    def close(self) -> None:
        self.rtp.close()
        self.rtcp.close()


def paced_ticks(bank: LegBank, count: int, each) -> None:  # noqa: ANN001 - per-tick callback
    """Run the bank's receive/send on an absolute 20 ms schedule (a media clock), telling
    the bank how late each tick is, as the gateway's clock does."""
    start = time.monotonic()
    due = [start]
    bank.receive_path.late_by = lambda: max(0.0, time.monotonic() - due[0])
    for k in range(count):
        due[0] = start + k * 0.02
        each(k, "before")
        bank.receive()
        each(k, "during")
        bank.send()
        each(k, "after")
        time.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))


def srtp_site(tmp: Path, routes: str, ca: Authority | None = None) -> str:
    """A radio sending 1000 Hz at -12 dBFS and a recorder in talkgroup ``marine``; SIP over
    UDP and, given a CA, over TLS with a certificate it issues; ``routes`` as given."""
    keys = ""
    if ca is not None:
        issued = ca.issue("gateway.test")
        keys = (
            f'listen_tls = "127.0.0.1:{free_port()}"\n'
            f'tls_certificate = "{issued.certificate}"\ntls_key = "{issued.key}"'
        )
    return f"""
[site]
name = "srtp-test"
country = "CA"

[ports.radio1]
kind = "simulated_radio"
tone_hz = 1000.0
talk_every = "0s"
talk_for = "0s"
level_dbfs = -12.0

[ports.rec]
kind = "recorder"
directory = "{tmp / "talkgroup"}"
continuous = true

[talkgroups.marine]
members = ["radio1", "rec"]

[sip]
listen = "127.0.0.1:{free_port()}"
rtp_ports = "20000-31999"
{keys}
{routes}
"""


def route(number: str, srtp: str) -> str:
    return f'[sip.routes."{number}"]\ntalkgroup = "marine"\npublic = true\nsrtp = "{srtp}"\n'


def tone16(hz: float, k: int, level: float = 0.3) -> np.ndarray:
    t = (k * 320 + np.arange(320)) / 16000
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


# --- the media path, on the real bank ------------------------------------------------------


def test_bank_protects_and_checks_srtp_beside_a_plain_call_and_drops_forgeries():
    bank = LegBank(16000, 320, 0.02, capacity=4, rtcp_interval=0.5)
    secure, plain = SrtpPeer(600), SrtpPeer(900, srtp=False)
    gateway_key = new_crypto(1)
    secure.keys(gateway_key)
    row = bank.add(LegMedia(0, 101, secure.address, srtp=LegSrtp(secure.ours.key, gateway_key.key)))
    plain_row = bank.add(LegMedia(0, 101, plain.address))
    for confirmed in (row, plain_row):  # the dialogs' ACKs: the rows may send
        bank.start_sending(confirmed)
    heard_by_gateway: list[np.ndarray] = []
    to_bank = ("127.0.0.1", bank.port)

    def tick(k: int, when: str) -> None:
        if when == "before":
            secure.send(to_bank)
            plain.send(to_bank)
            time.sleep(0.001)  # on the wire before the bank drains (loopback: microseconds)
        elif when == "during":  # the engine's part: what each leg says, what it hears
            heard_by_gateway.append(
                bank.table.rx[row].copy() if bank.table.talking[row] else np.zeros(320)
            )
            bank.table.tx[row] = tone16(1000, k)
            bank.table.tx[plain_row] = tone16(1300, k)
            bank.table.tx_has[[row, plain_row]] = True
        else:
            secure.drain()
            plain.drain()

    try:
        paced_ticks(bank, 100, tick)
        # The gateway heard the SRTP peer's 600 Hz at its level, decrypted.
        said = np.concatenate(heard_by_gateway[-50:])
        assert abs(dominant_hz(said, 16000) - 600) < 10
        assert band_db(said, 16000, 600) > -17  # a 0.3 tone is -13.5 dB
        # The SRTP peer hears 1000 Hz after decrypting with the gateway's key...
        assert all(len(p) == 12 + 160 + TAG for p in secure.wire), "SRTP packets carry a tag"
        heard = secure.heard()
        assert abs(dominant_hz(heard, RATE) - 1000) < 10
        clear = band_db(heard, RATE, 1000)
        assert clear > -17
        # ...and what crossed the wire is not the G.711 of that tone: decoded, it is noise.
        assert tone_share(heard, RATE, 1000) > -1
        assert tone_share(secure.wire_audio(), RATE, 1000) < -10, "the tone is on the wire"
        # The plain call in the same batch is untouched: plain G.711 of its 1300 Hz.
        assert all(len(p) == 172 for p in plain.wire)
        plain_heard = decode([p[12:] for p in plain.wire[-50:]])
        assert abs(dominant_hz(plain_heard, RATE) - 1300) < 10
        # Reports are SRTCP: they open with the gateway's key and say what was sent.
        reports = [parse_compound(secure.rx.unprotect_rtcp(p)) for p in secure.rtcp_wire]
        assert reports and all(r and r[0].ssrc == int(bank.table.tx_ssrc[row]) for r in reports)
        assert parse_compound(secure.rtcp_wire[-1]) is None, "a report readable without the key"

        # Forgeries: a bad tag, a plain packet, a replay, junk: all dropped and counted.
        before = dict(bank.table.malformed)
        packets_before = int(bank.table.packets_in[row])
        forged = bytearray(secure.packet())
        forged[-1] ^= 0x01
        secure.rtp.sendto(bytes(forged), to_bank)
        secure.srtp = False
        secure.rtp.sendto(secure.packet(), to_bank)  # plain RTP on an SRTP call
        secure.srtp = True
        secure.rtp.sendto(secure.history[-3], to_bank)  # replayed
        secure.rtp.sendto(b"\x80\x00" + secrets.token_bytes(30), to_bank)
        expected = {"srtp_auth": 3, "srtp_replay": 1}

        def counted() -> dict[str, int]:
            bank.receive()
            return {k: v - before[k] for k, v in bank.table.malformed.items() if v != before[k]}

        wait_for(lambda: counted() == expected, 5, f"the bank to count {expected}")
        assert bank.table.media[row].malformed == 4
        assert int(bank.table.packets_in[row]) == packets_before, "a forged packet was accepted"
        assert bank.table.media[plain_row].malformed == 0
        # SRTCP from the peer is read; a plain report on an SRTP call is not.
        report = build_report(secure.ssrc, "peer@test", (0, 0, 1, 160), None)
        secure.rtcp.sendto(secure.tx.protect_rtcp(report), ("127.0.0.1", bank.port + 1))
        secure.rtcp.sendto(report, ("127.0.0.1", bank.port + 1))
        wait_for(
            receiving(bank, lambda: bank.table.media[row].rtcp.reports_in), 5, "the SRTCP report"
        )
        assert bank.table.media[row].rtcp.reports_in == 1
        assert bank.table.malformed["srtp_auth"] - before["srtp_auth"] == 4
    finally:
        bank.close()
        secure.close()
        plain.close()


def receiving(bank: LegBank, check: Callable[[], object]) -> Callable[[], object]:
    """``check`` after reading what the bank's sockets hold (no media clock runs here)."""

    def look() -> object:
        bank.receive()
        return check()

    return look


def test_a_phone_behind_nat_latches_an_srtp_call_only_with_its_key():
    """A packet from another port of the phone's host moves the call's media only if it
    authenticates: an attacker on that host without the key cannot take the audio."""
    bank = LegBank(16000, 320, 0.02, capacity=4)
    announced = SrtpPeer(600)  # the SDP's address; nothing is sent from it
    phone, attacker = SrtpPeer(600), SrtpPeer(900)
    gateway_key = new_crypto(1)
    phone.ours = attacker.ours = announced.ours  # the phone's key is the SDP's...
    phone.tx = Session(Policy(announced.ours.key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    attacker.tx = Session(Policy(new_crypto().key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    phone.keys(gateway_key)
    row = bank.add(
        LegMedia(0, 101, announced.address, srtp=LegSrtp(announced.ours.key, gateway_key.key))
    )
    to_bank = ("127.0.0.1", bank.port)
    try:
        for _ in range(3):
            attacker.send(to_bank)  # ...the attacker's is not
        wait_for(
            receiving(bank, lambda: bank.table.malformed["srtp_auth"] >= 3),
            5,
            "3 failed SRTP checks",
        )
        assert bank.table.malformed["srtp_auth"] == 3
        assert not bank.table.latched[row] and bank.table.media[row].remote == announced.address
        phone.send(to_bank)
        wait_for(
            receiving(bank, lambda: bank.table.latched[row]), 5, "the call to latch to the phone"
        )
        assert bank.table.media[row].remote == phone.address
    finally:
        bank.close()
        for peer in (announced, phone, attacker):
            peer.close()


def test_srtcp_multiplexed_on_the_rtp_port_both_ways():
    """With a=rtcp-mux the peer's SRTCP comes on the RTP port (decrypted with the RTP in the
    batch) and our SRTCP reports go to its RTP address."""
    bank = LegBank(16000, 320, 0.02, capacity=2, rtcp_interval=0.5)
    peer = SrtpPeer(600)
    gateway_key = new_crypto(1)
    peer.keys(gateway_key)
    media = LegMedia(
        0,
        101,
        peer.address,
        srtp=LegSrtp(peer.ours.key, gateway_key.key),
        rtcp=RtcpState(peer.address, mux=True),
    )
    bank.start_sending(bank.add(media))  # confirmed (ACKed): it may send
    to_bank = ("127.0.0.1", bank.port)

    def tick(k: int, when: str) -> None:
        if when == "before":
            peer.send(to_bank)
            if k == 10:  # a receiver report, SRTCP, on the RTP port
                report = build_report(peer.ssrc, "peer@test", None, None)
                peer.rtp.sendto(peer.tx.protect_rtcp(report), to_bank)
        elif when == "after":
            peer.drain()

    try:
        paced_ticks(bank, 60, tick)
        assert media.rtcp.reports_in == 1
        assert bank.table.malformed["srtp_auth"] == 0 and media.malformed == 0
        reports = [p for p in peer.wire if 192 <= p[1] <= 223]
        assert reports, "no report on the RTP port"
        assert all(parse_compound(peer.rx.unprotect_rtcp(p)) for p in reports)
        audio = [p for p in peer.wire if p[1] & 0x7F == 0]
        assert len(audio) >= 50 and all(peer.rx.unprotect(p) for p in audio[-5:])
    finally:
        bank.close()
        peer.close()


# --- keys and policy ---------------------------------------------------------------------


def test_crypto_lines_we_can_and_cannot_use():
    key = secrets.token_bytes(30)
    inline = __import__("base64").b64encode(key).decode()
    good = parse_crypto(f"a=crypto:3 {SUITE} inline:{inline}")
    assert good == Crypto(3, key)
    assert parse_crypto(f"a=crypto:1 {SUITE} inline:{inline}|2^31") == Crypto(1, key)
    assert parse_crypto(f"a=crypto:1 {SUITE} inline:{inline} WSH=64") == Crypto(1, key)
    short = __import__("base64").b64encode(key[:20]).decode()
    for bad in (
        f"a=crypto:1 AES_CM_128_HMAC_SHA1_32 inline:{inline}",  # another suite
        f"a=crypto:1 {SUITE} inline:{inline}|2^31|1:4",  # an MKI
        f"a=crypto:1 {SUITE} inline:{inline};inline:{inline}",  # several keys
        f"a=crypto:1 {SUITE} inline:{inline} UNENCRYPTED_SRTP",  # a downgrade
        f"a=crypto:1 {SUITE} inline:{inline} KDR=10",
        f"a=crypto:1 {SUITE} inline:{short}",  # too short
        f"a=crypto:1 {SUITE} inline:{inline[:-2]}!!",  # not base64
        f"a=crypto:x {SUITE} inline:{inline}",
        "a=crypto:1",
    ):
        assert parse_crypto(bad) is None, bad
    assert parse_crypto(good.attribute()) == good


def test_policy_decides_by_transport_profile_and_keys():
    key = (new_crypto(),)
    cases = [
        # policy, transport, SAVP, keys → SRTP?, refused?
        ("required", "tls", True, key, True, False),
        ("required", "tls", False, key, True, False),  # RTP/AVP with keys (best effort)
        ("required", "tls", False, (), False, True),
        ("required", "udp", True, key, False, True),
        ("required", "tcp", False, (), False, True),
        ("optional", "tls", True, key, True, False),
        ("optional", "tls", True, (), False, True),  # SAVP without a usable key
        ("optional", "tls", False, (), False, False),
        ("optional", "udp", False, key, False, False),  # keys over UDP: ignored, plain
        ("optional", "udp", True, key, False, True),  # SAVP over UDP cannot be answered
        ("off", "tls", True, key, False, True),
        ("off", "tls", False, key, False, False),
    ]
    for policy, transport, savp, offered, srtp, refused in cases:
        chosen, reason = accept_keys(policy, transport, savp, offered)
        assert (chosen is not None, bool(reason)) == (srtp, refused), (policy, transport, savp)
    assert strictest("optional", "required", "off") == "required"
    assert strictest("optional", "off") == "off"
    assert strictest("optional") == "optional"


def test_check_refuses_required_srtp_where_no_call_can_come_over_tls(tmp_path):
    dial_out = '[sip.dial_out.coast]\ntalkgroup = "marine"\nuri = "URI"\nsrtp = "required"\n'
    ca = Authority(tmp_path / "pki")
    with pytest.raises(ConfigError, match="make the uri 'sips:coast@192.0.2.7'"):
        parse_config(srtp_site(tmp_path, dial_out.replace("URI", "sip:coast@192.0.2.7"), ca))
    assert parse_config(srtp_site(tmp_path, dial_out.replace("URI", "sips:coast@192.0.2.7"), ca))
    with pytest.raises(ConfigError, match=r"routes.6001\] srtp = 'required'.*listen_tls"):
        parse_config(srtp_site(tmp_path, route("6001", "required")))
    assert parse_config(srtp_site(tmp_path, route("6001", "required"), ca))
    account = '[sip.accounts.pbx]\nregistrar = "127.0.0.1:5060"\nusername = "6001"\n'
    with pytest.raises(ConfigError, match=r"accounts.pbx\] srtp = 'required'.*registrar is UDP"):
        parse_config(srtp_site(tmp_path, account + 'srtp = "required"\n', ca))


# --- real INVITEs over UDP ----------------------------------------------------------------


def invite_text(
    port: int,
    me: int,
    number: str,
    media: int,
    profile: str,
    crypto: Crypto | None,
    transport: str = "UDP",
) -> bytes:
    body = (
        f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {media} {profile} 0 101\r\n"
        "a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
        + (f"{crypto.attribute()}\r\n" if crypto else "")
        + "a=ptime:20\r\n"
    )
    tag = secrets.token_hex(4)
    return (
        f"INVITE sip:{number}@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:{me};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
        f"From: <sip:tester@127.0.0.1>;tag={tag}\r\nTo: <sip:{number}@127.0.0.1>\r\n"
        f"Call-ID: {secrets.token_hex(8)}@127.0.0.1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        f"Contact: <sip:tester@127.0.0.1:{me};transport={transport.lower()}>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def ack_for(invite: bytes, answer: str) -> bytes:
    """The ACK of a 2xx: the INVITE's dialog headers, the answer's To (with its tag)."""
    head = invite.decode().split("\r\n\r\n")[0].split("\r\n")
    keep = [h for h in head[1:] if h.split(":")[0] in ("Via", "From", "Call-ID", "Max-Forwards")]
    to = re.search(r"^To: (.+)$", answer, re.M).group(1).strip()
    uri = head[0].split(" ")[1]
    lines = [f"ACK {uri} SIP/2.0", *keep, f"To: {to}", "CSeq: 1 ACK", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def final_response(sock: socket.socket) -> str:
    def final() -> str | None:
        try:
            text = sock.recv(65535).decode()
        except BlockingIOError:
            return None
        return text if re.match(r"SIP/2\.0 [2-6]\d\d", text) else None

    return await until(final, 5, "a final response")


def test_required_refuses_with_488_over_udp_optional_answers_plain(tmp_path):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    me = sock.getsockname()[1]
    toml = srtp_site(
        tmp_path,
        route("6001", "required") + route("6002", "optional") + route("6003", "off"),
        Authority(tmp_path / "pki"),
    )

    async def scenario() -> None:
        async with running_gateway(toml) as gw:
            port = gw.sip.port

            media = iter(range(40000, 40200, 2))  # a media port per call (one in use: 488)

            async def ask(number: str, profile: str, crypto: Crypto | None) -> str:
                sock.sendto(
                    invite_text(port, me, number, next(media), profile, crypto),
                    ("127.0.0.1", port),
                )
                return await final_response(sock)

            key = new_crypto(1)
            # required: nothing over UDP, keys or not.
            for profile, crypto in (("RTP/AVP", None), ("RTP/AVP", key), ("RTP/SAVP", key)):
                answer = await ask("6001", profile, crypto)
                assert answer.startswith("SIP/2.0 488"), (profile, answer.splitlines()[0])
            # optional: keys over UDP are not taken; a plain answer (no keys of ours either).
            answer = await ask("6002", "RTP/AVP", key)
            assert answer.startswith("SIP/2.0 200"), answer.splitlines()[0]
            assert re.search(r"^m=audio \d+ RTP/AVP ", answer, re.M)
            assert "a=crypto" not in answer
            assert not gw.sip.bank.table.srtp[legs(gw)[0].row]
            # optional, RTP/SAVP over UDP: cannot be answered plain, cannot take the keys.
            assert (await ask("6002", "RTP/SAVP", key)).startswith("SIP/2.0 488")
            # off: SAVP refused, plain answered.
            assert (await ask("6003", "RTP/SAVP", key)).startswith("SIP/2.0 488")
            assert (await ask("6003", "RTP/AVP", None)).startswith("SIP/2.0 200")
            assert gw.sip.calls.rejected == {488: 5}

    try:
        run(scenario())
    finally:
        sock.close()


async def tls_request(writer, reader, data: bytes) -> str:  # noqa: ANN001 - asyncio streams
    """Send one SIP request on a TLS connection; the final response (framed by Content-Length)."""
    writer.write(data)
    await writer.drain()
    while True:
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
        length = re.search(r"^Content-Length:\s*(\d+)", head, re.M | re.I)
        body = await reader.readexactly(int(length.group(1))) if length else b""
        if not head.startswith("SIP/2.0 1"):
            return head + body.decode()


def test_an_srtp_call_over_tls_hears_and_is_heard_and_the_wire_is_noise(tmp_path):
    """A raw SIP UA over a real TLS connection offers RTP/SAVP with its key on a required
    route; its SRTP media peer hears the radio and is heard in the talkgroup."""
    ca = Authority(tmp_path / "pki")
    peer = SrtpPeer(600)
    toml = srtp_site(tmp_path, route("6001", "required"), ca)

    async def scenario() -> None:
        async with running_gateway(toml) as gw:
            context = ssl.create_default_context(cafile=str(ca.bundle))
            context.check_hostname = False  # the certificate is checked against the CA
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gw.sip.transport.port_for("tls"), ssl=context
            )
            me = writer.get_extra_info("sockname")[1]
            port = gw.sip.transport.port_for("tls")
            invite = invite_text(port, me, "6001", peer.address[1], "RTP/SAVP", peer.ours, "TLS")
            answer = await tls_request(writer, reader, invite)
            assert answer.startswith("SIP/2.0 200"), answer
            offer = read_offer(parse(answer.encode(), Source(("127.0.0.1", 5060))))
            assert offer.savp and len(offer.crypto) == 1 and offer.crypto[0].tag == 1
            assert offer.crypto[0].key != peer.ours.key, "the gateway sends with its own key"
            writer.write(ack_for(invite, answer))
            await writer.drain()
            peer.keys(offer.crypto[0])
            leg = legs(gw)[0]
            assert gw.sip.bank.table.srtp[leg.row]
            assert gw.sip.stats()["sip_calls_srtp"] == 1  # the metric's source
            media = ("127.0.0.1", offer.port)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for k in range(100):  # 2 s of the peer's tone, paced like a phone
                peer.send(media)
                peer.drain()
                await asyncio.sleep(max(0.0, start + (k + 1) * 0.02 - loop.time()))
            peer.drain()
            assert leg.stats()["packets_in"] >= 90
            assert gw.sip.bank.table.media[leg.row].malformed == 0
            writer.close()

    try:
        run(scenario())
    finally:
        peer.close()
    heard = peer.heard()
    assert abs(dominant_hz(heard, RATE) - 1000) < 15, "the phone does not hear the radio"
    clear = band_db(heard, RATE, 1000)
    assert clear > -20  # the radio talks at -12 dBFS peak
    assert tone_share(heard, RATE, 1000) > -1
    assert tone_share(peer.wire_audio(), RATE, 1000) < -10, "the tone is readable on the wire"
    talkgroup = recorded(tmp_path / "talkgroup")
    assert band_db(talkgroup, 16000, 600) > -25, "the talkgroup does not hear the phone"


# --- a real SRTP phone (baresip's srtp module) ----------------------------------------------


def encrypting(phone: Phone, mediaenc: str = "srtp-mand") -> Phone:
    """The phone with baresip's SDES module loaded and its account asking for SRTP."""
    config = phone.dir / "config"
    text = config.read_text()  # before account.so, which looks the mediaenc name up
    config.write_text(text.replace("module account.so", "module srtp.so\nmodule account.so"))
    accounts = phone.dir / "accounts"
    line = accounts.read_text().strip()
    accounts.write_text(line.replace(";answermode=", f";mediaenc={mediaenc};answermode=") + "\n")
    return phone


def test_an_srtp_phone_over_udp_is_refused_and_never_gets_a_key(phones, tmp_path):
    """baresip with mediaenc=srtp-mand over UDP offers RTP/SAVP with a key: on an optional
    route that is 488 (the key crossed the network in clear text; it is not used)."""
    phone = encrypting(phones("savp", tone(600, 6)))

    async def scenario() -> None:
        async with running_gateway(srtp_site(tmp_path, route("6001", "optional"))) as gw:
            phone.start(dial=f"sip:6001@127.0.0.1:{gw.sip.port}", seconds=4)
            await until(
                lambda: "488 Not Acceptable Here" in phone.output(), 10, "the phone to be refused"
            )
            assert gw.sip.calls.rejected == {488: 1}
            assert not legs(gw)

    run(scenario())


class Capture:
    """tshark on loopback, filtered to one UDP port, stopped by its PID; the datagrams' bytes."""

    def __init__(self, directory: Path, port: int) -> None:
        self.binary = require_binary("tshark")
        self.file = directory / "media.pcap"
        self.log = directory / "tshark.log"
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "-i",
                    "lo",
                    "-f",
                    f"udp port {self.port}",
                    "-F",
                    "pcap",
                    "-w",
                    str(self.file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def capturing(self) -> bool:
        return "Capturing on" in self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def datagrams(self) -> list[tuple[int, int, bytes]]:
        """(source port, destination port, payload) of every UDP datagram captured."""
        fields = subprocess.run(
            [
                self.binary,
                "-r",
                str(self.file),
                "-T",
                "fields",
                "-e",
                "udp.srcport",
                "-e",
                "udp.dstport",
                "-e",
                "udp.payload",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        out = []
        for line in fields.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[2]:
                out.append((int(parts[0]), int(parts[1]), bytes.fromhex(parts[2].replace(":", ""))))
        return out


def both(issued) -> Path:  # noqa: ANN001 - pki.Issued
    """baresip wants its certificate and key in one PEM file."""
    path = issued.certificate.with_suffix(".pem")
    path.write_bytes(issued.certificate.read_bytes() + issued.key.read_bytes())
    return path


def test_baresip_over_tls_with_srtp_hears_and_is_heard_and_the_wire_is_noise(phones, tmp_path):
    """baresip (mediaenc=srtp-mand, its srtp module) dials a required-SRTP talkgroup straight
    over TLS: both ways the tone is heard at its level, and the RTP captured on loopback
    does not decode to it."""
    ca = Authority(tmp_path / "pki")
    source = np.concatenate([np.zeros(RATE), tone(600, 9)])
    phone = encrypting(
        phones(
            "secure",
            source,
            transport="tls",
            cafile=ca.bundle,
            certificate=both(ca.issue("phone.test")),
        )
    )
    capture: Capture | None = None

    async def scenario() -> None:
        nonlocal capture
        async with running_gateway(srtp_site(tmp_path, route("6001", "required"), ca)) as gw:
            capture = Capture(tmp_path, gw.sip.bank.port)
            capture.start()
            await until(capture.capturing, 20, "tshark to capture")
            tls_port = gw.sip.transport.port_for("tls")
            phone.start(dial=f"sip:6001@127.0.0.1:{tls_port};transport=tls", seconds=5)
            await until(lambda: legs(gw), 15, "the call to be answered")
            leg = legs(gw)[0]
            dialog = next(iter(gw.sip.calls.dialogs.values()))
            assert dialog.peer.transport == "tls"
            assert gw.sip.bank.table.srtp[leg.row], "the call is not SRTP"
            await until(lambda: leg.stats().get("packets_in", 0) >= 100, 10, "the phone's SRTP")
            # (baresip also sends an RTCP APP "PING" in clear before its SRTP starts: that one
            # is dropped as srtp_auth on the RTCP port; none of its RTP is.)
            assert leg.stats()["packets_malformed"] <= 2
            await until(lambda: not phone.running(), 15, "the phone to hang up")
            await until(lambda: not legs(gw), 10, "BYE to end the leg")

    try:
        run(scenario())
    finally:
        if capture is not None:
            capture.stop()
    assert "srtp" in phone.output().lower()
    heard = phone.heard()
    assert len(heard) > 2 * RATE, "the call was too short to judge"
    middle = heard[RATE : len(heard) - RATE // 2]
    assert abs(dominant_hz(middle, RATE) - 1000) < 15, "the phone does not hear the radio"
    assert band_db(middle, RATE, 1000) > -20
    assert band_db(middle, RATE, 600) < band_db(middle, RATE, 1000) - 30, "phone hears itself"
    assert band_db(recorded(tmp_path / "talkgroup"), 16000, 600) > -30, "phone not heard"
    # On the wire: RTP with a 10-byte tag, and what would be G.711 is noise both ways.
    assert capture is not None
    bank_port = capture.port
    rtp = [(s, d, p) for s, d, p in capture.datagrams() if len(p) >= 12 and p[1] & 0x7F == 0]
    to_phone = [p for s, _, p in rtp if s == bank_port]
    from_phone = [p for _, d, p in rtp if d == bank_port]
    assert len(to_phone) > 100 and len(from_phone) > 100, (len(to_phone), len(from_phone))
    assert {len(p) for p in to_phone} == {12 + 160 + TAG}
    assert {len(p) for p in from_phone} == {12 + 160 + TAG}
    wire_down = decode([p[12:172] for p in to_phone[-100:]])
    wire_up = decode([p[12:172] for p in from_phone[-100:]])
    assert tone_share(middle, RATE, 1000) > -1
    assert tone_share(wire_down, RATE, 1000) < -10, "the radio's tone is readable on the wire"
    assert tone_share(wire_up, RATE, 600) < -10, "the phone's tone is readable on the wire"


def listening(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:port (a phone's TLS port, started)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def test_a_sips_dial_out_offers_srtp_and_the_called_phone_hears_the_talkgroup(phones, tmp_path):
    """A dial-out to a sips: URI offers RTP/SAVP with our key; baresip (srtp-mand, TLS on its
    SIP port + 1) answers with its own; it hears the radio and is heard."""
    ca = Authority(tmp_path / "pki")
    source = np.concatenate([np.zeros(RATE), tone(600, 12)])
    phone = encrypting(
        phones(
            "coast",
            source,
            transport="tls",
            cafile=ca.bundle,
            certificate=both(ca.issue("127.0.0.1")),
        )
    )
    dial_out = f"""
[sip.dial_out.coast]
talkgroup = "marine"
uri = "sips:coast@127.0.0.1:{phone.port + 1}"
srtp = "required"
"""
    toml = srtp_site(tmp_path, route("6001", "optional") + dial_out, ca)
    toml = toml.replace("[sip]\n", f'[sip]\ntls_ca = "{ca.bundle}"\n', 1)
    phone.start(seconds=10)

    async def scenario() -> None:
        await until(lambda: listening(phone.port + 1), 10, "the phone to listen for TLS")
        async with running_gateway(toml) as gw:
            dialling = gw.sip.dial_outs["coast"]
            await until(lambda: dialling.connects >= 1, 15, "the dial-out to be answered")
            leg = legs(gw)[0]
            assert gw.sip.bank.table.srtp[leg.row], "the dial-out is not SRTP"
            await until(lambda: leg.stats().get("packets_in", 0) >= 150, 10, "the phone's SRTP")
            assert leg.stats()["packets_malformed"] <= 2  # baresip's clear RTCP "PING"
            await until(lambda: not phone.running(), 15, "the phone to finish")

    run(scenario())
    heard = phone.heard()
    assert len(heard) > 3 * RATE, "the call was too short to judge"
    middle = heard[RATE : len(heard) - RATE // 2]
    assert abs(dominant_hz(middle, RATE) - 1000) < 15, "the phone does not hear the radio"
    assert band_db(middle, RATE, 1000) > -20
    assert band_db(recorded(tmp_path / "talkgroup"), 16000, 600) > -30, "phone not heard"


def test_an_optional_dial_out_to_a_phone_without_srtp_calls_again_plain(phones, tmp_path, caplog):
    """Under ``optional`` a sips: dial-out offers SRTP first; a phone that refuses it (488)
    is called again with plain RTP, and the call carries the talkgroup."""
    ca = Authority(tmp_path / "pki")
    phone = phones(
        "plain",
        np.concatenate([np.zeros(RATE), tone(600, 12)]),
        transport="tls",
        cafile=ca.bundle,
        certificate=both(ca.issue("127.0.0.1")),
    )
    dial_out = f"""
[sip.dial_out.plain]
talkgroup = "marine"
uri = "sips:plain@127.0.0.1:{phone.port + 1}"
"""
    toml = srtp_site(tmp_path, route("6001", "optional") + dial_out, ca)
    toml = toml.replace("[sip]\n", f'[sip]\ntls_ca = "{ca.bundle}"\n', 1)
    phone.start(seconds=8)
    caplog.set_level("INFO", "gateway.sip.calls")

    async def scenario() -> None:
        await until(lambda: listening(phone.port + 1), 10, "the phone to listen for TLS")
        async with running_gateway(toml) as gw:
            dialling = gw.sip.dial_outs["plain"]
            await until(lambda: dialling.connects >= 1, 15, "the dial-out to be answered")
            assert dialling.attempts == 1, "not called again at once"
            leg = legs(gw)[0]
            assert not gw.sip.bank.table.srtp[leg.row]
            await until(lambda: leg.stats().get("packets_in", 0) >= 100, 10, "the phone's RTP")
            await until(lambda: not phone.running(), 15, "the phone to finish")

    run(scenario())
    assert "refused SRTP; calling again with plain RTP" in caplog.text  # it did say 488
    middle = phone.heard()[RATE : -RATE // 2]
    assert abs(dominant_hz(middle, RATE) - 1000) < 15, "the phone does not hear the radio"
