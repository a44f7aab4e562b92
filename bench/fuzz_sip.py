"""Fuzz the SIP edge of a live gateway on loopback: malformed SIP, RTP and RTCP with a call up.

    .venv/bin/python bench/fuzz_sip.py                     # 100,000 messages, about 2 minutes
    .venv/bin/python bench/fuzz_sip.py --count 1000000     # the full run (about 15 minutes)

The gateway runs in its own process (``borderlink run`` on a generated site: a
simulated radio at 1 kHz in talkgroup ``live``, and short ``ack_timeout`` and
``media_timeout`` so the calls a fuzzer leaves behind are seen to go away within the
run; the per-source caps are opened so the fuzzer's INVITEs do make calls). Two
well-behaved callers in this process (raw SIP/RTP endpoints, G.711 µ-law,
each with its own tone) call into ``live`` and stream for the whole run, paced on a
20 ms schedule by a thread of their own. Then ``--count`` messages, a mix of kinds,
go at ``--rate`` per second, all to 127.0.0.1:

* SIP: mutations of real INVITE/BYE/OPTIONS/ACK/200 (cut short, bytes flipped or
  inserted, case changed), huge/negative/garbage Content-Length, bad start lines,
  binary junk, header floods, and well-formed INVITEs that are never ACKed or ACKed
  and then silent (each makes a call the timers must end);
* RTP to the shared media port: junk from strangers' ports, and from the live
  caller's own address malformed packets and a tone under another SSRC (an injection
  that must not be heard);
* RTCP to the RTCP port and muxed on the RTP port: junk, and mutated SR/RR.

It prints messages sent per kind, crashes (the gateway process died), unhandled
exceptions (tracebacks in the gateway's log, and requests answered 500), the
gateway's own counters (SIP malformed/refused, RTP dropped by kind), calls left over
after the run against the baseline (after the timers had time to end the fuzzer's
calls), RSS before and after (goal: growth < 5 MB), and whether the live call's audio
is still right: what the live caller hears (the radio's 1 kHz and the other caller's
tone, frequency and level) before, during and after the run, and that the injected
tone was never heard.

* SIP over TCP (the stream framing TLS shares): messages split over many writes,
  several merged in one, a Content-Length far larger than what follows, mutated
  messages, junk, header floods, and slow senders (a byte every 100 ms, on a thread,
  a few connections at a time) that ``message_timeout`` must cut off. TLS is the same
  framer behind a handshake (its own bench: bench/sip_streams.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.codecs.g711 import ulaw_decode, ulaw_encode  # noqa: E402

from tests.waiting import wait_for  # noqa: E402

RATE = 8000
HEADER = struct.Struct("!BBHII")

SITE = """
[site]
name = "sip-fuzz"
country = "CA"

[ports.radio]
kind = "simulated_radio"
tone_hz = 1000
talk_every = "0s"
talk_for = "0s"
level_dbfs = -12.0
tot = "0s"  # it talks for the whole run: no time-out timer (3 min by default)

[talkgroups.live]
members = ["radio"]

[web]
host = "127.0.0.1"
port = {web}

[sip]
listen = "127.0.0.1:{sip}"
listen_tcp = "127.0.0.1:{tcp}"
message_timeout = "2s"
max_connections_per_address = 200
max_connection_rate_per_address = 500
rtp_ports = "20000-31999"
ack_timeout = "{ack}s"
media_timeout = "{media}s"
rtcp_interval = "1s"
# Caps high enough that the fuzzer's INVITEs (all from 127.0.0.1) make calls for the
# timers to end; the caps themselves are tested in tests/sip (test_auth).
max_calls = 1000
max_calls_per_source = 1000
invite_rate = 1000.0

[sip.routes."6001"]
talkgroup = "live"
public = true
vox_threshold_dbfs = -50.0
tot = "0s"  # the callers talk for the whole run too
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a well-behaved caller ----------------------------------------------------------------


class Caller:
    """One call into the gateway: INVITE/200/ACK, a tone as µ-law RTP every 20 ms, and what
    it hears kept (decoded) with the time each packet came."""

    def __init__(self, name: str, hz: float) -> None:
        self.name = name
        self.hz = hz
        self.sip = self._socket()
        self.rtp = self._socket()
        self.ssrc = secrets.randbits(32)
        self.seq = secrets.randbits(16)
        self.ts = secrets.randbits(32)
        self.phase = 0
        self.remote: tuple[str, int] | None = None
        self.heard: list[tuple[float, bytes]] = []
        self.lock = threading.Lock()

    @staticmethod
    def _socket() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        return s

    def call(self, gateway: tuple[str, int], number: str) -> None:
        me = self.sip.getsockname()[1]
        call_id = f"{secrets.token_hex(8)}@127.0.0.1"
        body = (
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {self.rtp.getsockname()[1]} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
        )
        common = (
            f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
            f"From: <sip:{self.name}@127.0.0.1>;tag={self.name}\r\nCall-ID: {call_id}\r\n"
            "Max-Forwards: 70\r\n"
        )
        self.sip.sendto(
            (
                f"INVITE sip:{number}@127.0.0.1 SIP/2.0\r\n{common}To: <sip:{number}@127.0.0.1>\r\n"
                f"CSeq: 1 INVITE\r\nContact: <sip:{self.name}@127.0.0.1:{me}>\r\n"
                f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            ).encode(),
            gateway,
        )
        self.sip.settimeout(5)
        while True:
            text = self.sip.recv(65535).decode()
            if text.startswith("SIP/2.0 200"):
                break
        self.sip.setblocking(False)
        self.remote = ("127.0.0.1", int(re.search(r"^m=audio (\d+)", text, re.M)[1]))
        to = re.search(r"^To: (.+)$", text, re.M)[1].strip()
        self.sip.sendto(
            (
                f"ACK sip:{number}@127.0.0.1 SIP/2.0\r\n{common}To: {to}\r\nCSeq: 1 ACK\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode(),
            gateway,
        )
        self.rtp.setblocking(False)

    def frame(self) -> bytes:
        t = (self.phase + np.arange(160)) / RATE
        self.phase += 160
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * self.hz * t)).astype(np.int16)
        packet = HEADER.pack(0x80, 0, self.seq & 0xFFFF, self.ts & 0xFFFFFFFF, self.ssrc)
        self.seq += 1
        self.ts += 160
        return packet + ulaw_encode(pcm).tobytes()

    def tick(self) -> None:
        with contextlib.suppress(OSError):  # an ICMP error queued on the socket: go on
            self.rtp.sendto(self.frame(), self.remote)
        now = time.monotonic()
        while True:
            try:
                data = self.rtp.recv(2048)
            except BlockingIOError:
                break
            except OSError:  # ICMP port unreachable reported on this socket: not fatal
                continue
            if len(data) > 12 and data[1] & 0x7F == 0:
                with self.lock:
                    self.heard.append((now, data[12:]))
        with contextlib.suppress(OSError):  # read the gateway's SIP, if any
            while True:
                self.sip.recv(65535)

    def audio(self, start: float, end: float) -> np.ndarray:
        with self.lock:
            codes = b"".join(p for t, p in self.heard if start <= t < end)
        return ulaw_decode(np.frombuffer(codes, np.uint8)).astype(np.float32) / 32768


class Pacer(threading.Thread):
    """The callers' 20 ms clock, apart from the fuzzing loop (which must not starve it)."""

    def __init__(self, callers: list[Caller]) -> None:
        super().__init__(daemon=True)
        self.callers = callers
        self.stopping = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        k = 0
        while not self.stopping.is_set():
            for caller in self.callers:
                caller.tick()
            k += 1
            delay = start + k * 0.02 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.2:  # far behind (a busy machine): start the schedule again
                start, k = time.monotonic(), 0


def band_db(x: np.ndarray, hz: float, width: float = 40.0) -> float:
    if len(x) < 800:
        return -120.0
    window = np.hanning(len(x))
    power = np.abs(np.fft.rfft(x * window)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    band = power[(freqs > hz - width) & (freqs < hz + width)].sum()
    return float(10 * np.log10(max(band / ((window**2).sum() / 2) / len(x), 1e-12)))


def dominant_hz(x: np.ndarray) -> float:
    if len(x) < 800:
        return 0.0
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    spectrum[freqs < 100] = 0
    return float(freqs[int(np.argmax(spectrum))])


# --- what the fuzzer sends --------------------------------------------------------------


def sdp(port: int) -> str:
    return (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\na=ptime:20\r\n"
    )


def request(
    method: str,
    me: int,
    body: str = "",
    call_id: str | None = None,
    to_tag: str = "",
    cseq: int = 1,
) -> bytes:
    lines = [
        f"{method} sip:6001@127.0.0.1 SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{secrets.token_hex(5)};rport",
        "Max-Forwards: 70",
        "From: <sip:fuzz@127.0.0.1>;tag=fz",
        f"To: <sip:6001@127.0.0.1>{';tag=' + to_tag if to_tag else ''}",
        f"Call-ID: {call_id or secrets.token_hex(8)}@127.0.0.1",
        f"CSeq: {cseq} {'INVITE' if method == 'ACK' else method}",
        f"Contact: <sip:fuzz@127.0.0.1:{me}>",
    ]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


class Fuzzer:
    """Makes one datagram of a kind; ``send`` puts it on the wire to the right port."""

    def __init__(self, sip: int, rtp: int, live: Caller, rng: random.Random) -> None:
        self.sip_address = ("127.0.0.1", sip)
        self.rtp_address = ("127.0.0.1", rtp)
        self.rtcp_address = ("127.0.0.1", rtp + 1)
        self.live = live
        self.rng = rng
        self.sockets = [Caller._socket() for _ in range(8)]  # strangers' source ports
        for s in self.sockets:
            s.setblocking(False)
        self.me = self.sockets[0].getsockname()[1]
        self.sink = Caller._socket()  # where fuzzed calls' SDP points (if ever ACKed)
        self.sink.setblocking(False)
        self.templates = [
            request("INVITE", self.me, sdp(self.sink.getsockname()[1])),
            request("BYE", self.me),
            request("OPTIONS", self.me),
            request("ACK", self.me),
            request("CANCEL", self.me),
            b"SIP/2.0 200 OK\r\n" + request("INVITE", self.me).split(b"\r\n", 1)[1],
        ]
        self.injected_ssrc = live.ssrc ^ 0x5A5A5A5A
        self.injected_phase = 0
        self.kinds = {
            "sip_mutated": self.sip_mutated,
            "sip_truncated": self.sip_truncated,
            "sip_content_length": self.sip_content_length,
            "sip_start_line": self.sip_start_line,
            "sip_binary": self.sip_binary,
            "sip_header_flood": self.sip_header_flood,
            "sip_invite_no_ack": self.sip_invite_no_ack,
            "sip_invite_silent": self.sip_invite_silent,
            "rtp_stranger": self.rtp_stranger,
            "rtp_live_malformed": self.rtp_live_malformed,
            "rtp_live_injected": self.rtp_live_injected,
            "rtcp_junk": self.rtcp_junk,
            "rtcp_mutated": self.rtcp_mutated,
        }
        self.pending_acks: list[tuple[float, bytes]] = []

    # -- SIP --
    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            at = rng.randrange(max(1, len(b)))
            if op < 0.35 and b:
                b[at] = rng.randrange(256)
            elif op < 0.6:
                b[at:at] = rng.randbytes(rng.randint(1, 12))
            elif op < 0.8 and b:
                del b[at : at + rng.randint(1, 20)]
            else:
                b = bytearray(b.upper() if rng.random() < 0.5 else b.swapcase())
        return bytes(b)

    def sip_mutated(self):
        return self.sip_address, self.mutate(self.rng.choice(self.templates))

    def sip_truncated(self):
        data = self.rng.choice(self.templates)
        return self.sip_address, data[: self.rng.randrange(len(data))]

    def sip_content_length(self):
        value = self.rng.choice(
            [
                "-1",
                "-999999",
                "99999999999999999999",
                "4294967296",
                "1e3",
                "0x10",
                "",
                " 5 5",
                str(self.rng.randrange(10**6)),
            ]
        )
        data = re.sub(
            rb"Content-Length: \d+", f"Content-Length: {value}".encode(), self.templates[0]
        )
        return self.sip_address, data

    def sip_start_line(self):
        line = self.rng.choice(
            [
                b"INVITE",
                b"INVITE sip:6001@127.0.0.1",
                b"INVITE  SIP/2.0",
                b"FOO bar SIP/2.0",
                b"INVITE sip:6001@127.0.0.1 SIP/3.0",
                b"SIP/2.0 99999 X",
                b"SIP/2.0",
                b"\xff\xfe",
                b"REGISTER sip:127.0.0.1 SIP/2.0",
                b"INFO sip:6001@127.0.0.1 SIP/2.0",
                b"INVITE " + b"a" * 5000 + b" SIP/2.0",
            ]
        )
        data = self.rng.choice(self.templates)
        return self.sip_address, line + data[data.index(b"\r\n") :]

    def sip_binary(self):
        return self.sip_address, self.rng.randbytes(self.rng.randint(1, 1400))

    def sip_header_flood(self):
        data = self.rng.choice(self.templates)
        head, body = data.split(b"\r\n\r\n", 1)
        line = self.rng.choice(
            [
                b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx",
                b"X-Junk: " + b"j" * 50,
                b"Contact: <sip:a@127.0.0.1>",
                b"Route: <sip:127.0.0.1;lr>",
            ]
        )
        flood = b"\r\n".join([line] * self.rng.randint(50, 400))
        return self.sip_address, head + b"\r\n" + flood + b"\r\n\r\n" + body

    def media_port(self) -> int:
        """Where a fuzzed call's SDP points: a port of its own (one already in use by
        another call is refused, 488), on loopback, where nobody listens."""
        return self.rng.randrange(40000, 60000, 2)

    def sip_invite_no_ack(self):
        """A well-formed INVITE never ACKed: a call Timer H must end (and no RTP before)."""
        return ("own", self.sip_address), request("INVITE", self.me, sdp(self.media_port()))

    def sip_invite_silent(self):
        """A well-formed INVITE, ACKed a moment later, then silent: the media timeout ends it."""
        call_id = secrets.token_hex(8)
        invite = request("INVITE", self.me, sdp(self.media_port()), call_id=call_id)
        self.pending_acks.append((time.monotonic() + 0.3, call_id.encode()))
        return ("own", self.sip_address), invite

    def answer_acks(self) -> None:
        """ACK the 200s the silent INVITEs got (read off the first stranger socket)."""
        sock = self.sockets[0]
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                break
            if not data.startswith(b"SIP/2.0 200") or b"CSeq: 1 INVITE" not in data:
                continue
            call = re.search(rb"^Call-ID: (\w+)@", data, re.M)
            tag = re.search(rb"^To: [^\r]*;tag=(\w+)", data, re.M)
            if call and tag and any(c == call[1] for _, c in self.pending_acks):
                self.pending_acks = [(t, c) for t, c in self.pending_acks if c != call[1]]
                ack = request("ACK", self.me, call_id=call[1].decode(), to_tag=tag[1].decode())
                sock.sendto(ack, self.sip_address)
        now = time.monotonic()
        self.pending_acks = [(t, c) for t, c in self.pending_acks if t > now - 5]
        with contextlib.suppress(BlockingIOError):
            while True:
                self.sink.recv(2048)  # should stay empty until an ACK; drained either way

    # -- RTP --
    def rtp_stranger(self):
        rng = self.rng
        if rng.random() < 0.5:
            data = rng.randbytes(rng.randint(0, 300))
        else:
            data = HEADER.pack(
                0x80, 0, rng.randrange(65536), rng.randrange(1 << 32), rng.randrange(1 << 32)
            ) + bytes(160)
        return self.rtp_address, data

    def rtp_live_malformed(self):
        rng = self.rng
        good = HEADER.pack(0x80, 0, rng.randrange(65536), 0, self.live.ssrc)
        data = rng.choice(
            [
                bytes([0x80, 99]) + good[2:] + bytes(160),
                bytes([0x40]) + good[1:] + bytes(160),
                good[: rng.randrange(12)],
                bytes([0xA0]) + good[1:] + bytes([0, 0, 0, 200]),
                bytes([0x8F]) + good[1:] + bytes(8),
                bytes([0x90]) + good[1:] + bytes([0, 0, 0, 50]),
                good + bytes(1600),
                good,
                bytes([0x80, 101]) + good[2:] + bytes([99, 0, 0]),
                good + rng.randbytes(rng.randint(1, 300)),
            ]
        )
        return ("live", self.rtp_address), data

    def rtp_live_injected(self):
        """Another SSRC from the live caller's own address, with a 1400 Hz tone."""
        t = (self.injected_phase + np.arange(160)) / RATE
        self.injected_phase += 160
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * 1400 * t)).astype(np.int16)
        k = self.injected_phase // 160
        header = HEADER.pack(0x80, 0, k & 0xFFFF, (k * 160) & 0xFFFFFFFF, self.injected_ssrc)
        return ("live", self.rtp_address), header + ulaw_encode(pcm).tobytes()

    # -- RTCP --
    def rtcp_junk(self):
        rng = self.rng
        where = self.rtcp_address if rng.random() < 0.7 else self.rtp_address
        data = bytes([0x80 | rng.randrange(32), rng.choice([200, 201, 202, 203, 204])])
        return where, data + rng.randbytes(rng.randint(0, 200))

    def rtcp_mutated(self):
        rng = self.rng
        sr = struct.pack("!BBHI", 0x81, 200, 12, self.live.ssrc) + rng.randbytes(44)
        data = bytearray(sr)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        return ("live", self.rtcp_address if rng.random() < 0.8 else self.rtp_address), bytes(data)

    def send(self, kind: str) -> None:
        where, data = self.kinds[kind]()
        if where[0] == "live":
            self.live.rtp.sendto(data, where[1])  # from the live call's own address
        elif where[0] == "own":
            self.sockets[0].sendto(data, where[1])  # where the answers are read
        else:
            self.rng.choice(self.sockets).sendto(data, where)


class Streams:
    """SIP over TCP to the gateway's stream listener: one short connection per case."""

    def __init__(self, port: int, fuzzer: Fuzzer) -> None:
        self.address = ("127.0.0.1", port)
        self.fuzzer = fuzzer
        self.rng = fuzzer.rng
        self.refused = 0  # connections the gateway refused or reset (caps, framing errors)
        self.slow: list[threading.Thread] = []

    def options(self) -> bytes:
        return request("OPTIONS", self.fuzzer.me)

    def case(self, kind: str) -> None:
        rng = self.rng
        if kind == "tcp_slow":
            self.slow = [t for t in self.slow if t.is_alive()]
            if len(self.slow) < 4:  # a few at a time: each holds a connection for seconds
                thread = threading.Thread(target=self._slow, daemon=True)
                thread.start()
                self.slow.append(thread)
            return
        if kind == "tcp_split":
            data = self.options()
            cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8))))
            chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        elif kind == "tcp_merged":
            chunks = [b"".join(self.options() for _ in range(rng.randint(2, 6)))]
        elif kind == "tcp_huge_length":
            head = self.options().split(b"\r\n\r\n")[0]
            value = rng.choice([b"999999999", b"-5", b"65537", b"1" * 30])
            chunks = [
                re.sub(rb"Content-Length: \d+", b"Content-Length: " + value, head)
                + b"\r\n\r\n"
                + rng.randbytes(rng.randint(0, 500))
            ]
        elif kind == "tcp_mutated":
            chunks = [self.fuzzer.mutate(rng.choice(self.fuzzer.templates))]
        elif kind == "tcp_header_flood":
            chunks = [b"OPTIONS sip:6001@127.0.0.1 SIP/2.0\r\n" + b"X-Junk: j\r\n" * 3000]
        else:  # tcp_junk
            chunks = [rng.randbytes(rng.randint(1, 2000))]
        try:
            with socket.create_connection(self.address, timeout=2) as sock:
                for chunk in chunks:
                    sock.sendall(chunk)
        except OSError:
            self.refused += 1

    def _slow(self) -> None:
        """One byte every 100 ms until the gateway cuts the connection (or 6 s pass)."""
        data = self.options()
        try:
            with socket.create_connection(self.address, timeout=2) as sock:
                for k in range(60):
                    sock.sendall(data[k : k + 1])
                    time.sleep(0.1)
        except OSError:
            self.refused += 1

    def framing_check(self) -> str:
        """Three OPTIONS in one write and one split in three: four answers on the stream."""
        merged = b"".join(self.options() for _ in range(3))
        split = self.options()
        answers = b""
        with socket.create_connection(self.address, timeout=3) as sock:
            sock.sendall(merged)
            for part in (split[:7], split[7:60], split[60:]):
                sock.sendall(part)
                time.sleep(0.05)
            deadline = time.monotonic() + 3
            while answers.count(b"SIP/2.0 200") < 4 and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    answers += sock.recv(65535)
        return f"{answers.count(b'SIP/2.0 200')}/4 answered"


STREAM_KINDS = {
    "tcp_split": 1,
    "tcp_merged": 1,
    "tcp_huge_length": 1,
    "tcp_mutated": 1,
    "tcp_header_flood": 1,
    "tcp_junk": 1,
    "tcp_slow": 0.2,
}


# --- the gateway process -------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metrics(web: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("borderlink_sip_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="messages (all kinds)")
    parser.add_argument("--rate", type=float, default=4000.0, help="messages a second, at most")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--ack-timeout", type=float, default=4.0, help="the gateway's Timer H")
    parser.add_argument("--media-timeout", type=float, default=5.0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fuzz_sip."))
    sip_port, tcp_port, web = free_port(), free_port(), free_port()
    config = work / "site.toml"
    config.write_text(
        SITE.format(
            sip=sip_port, tcp=tcp_port, web=web, ack=args.ack_timeout, media=args.media_timeout
        )
    )
    log_path = work / "gateway.log"
    borderlink = Path(sys.executable).with_name("borderlink")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(borderlink), "run", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pacer: Pacer | None = None
    try:
        try:
            wait_for(lambda: _answers(web), 20, "the gateway to answer", interval=0.1)
        except AssertionError:
            print(log_path.read_text()[-3000:])
            raise SystemExit("the gateway did not start") from None
        rtp_port = _rtp_port(log_path, web)
        live, witness = Caller("live", 600), Caller("witness", 900)
        for caller in (live, witness):
            caller.call(("127.0.0.1", sip_port), "6001")
        pacer = Pacer([live, witness])
        pacer.start()
        time.sleep(3.0)  # the jitter buffers settle; this is the baseline window
        baseline = metrics(web)
        calls_before = baseline.get("borderlink_sip_calls_active", 0)
        rss_before = rss_kb(proc.pid)
        before = (time.monotonic() - 2.0, time.monotonic())

        fuzzer = Fuzzer(sip_port, rtp_port, live, rng)
        streams = Streams(tcp_port, fuzzer)
        names = [*fuzzer.kinds, *STREAM_KINDS]
        weights = [8, 4, 3, 3, 4, 2, 1, 1, 6, 3, 3, 3, 3, *STREAM_KINDS.values()]
        sent: Counter[str] = Counter()
        peak = [calls_before]
        samples: list[tuple[int, float, int]] = []  # (messages sent, calls up, RSS kB)
        every = max(1, args.count // 10)

        def fuzz(count: int) -> None:
            started = time.monotonic()
            polled = started
            for i in range(count):
                kind = rng.choices(names, weights)[0]
                if kind in STREAM_KINDS:
                    streams.case(kind)
                else:
                    fuzzer.send(kind)
                sent[kind] += 1
                if i % 200 == 0:
                    fuzzer.answer_acks()
                    ahead = started + i / args.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                    if proc.poll() is not None:
                        return
                    if time.monotonic() - polled > 1.0:
                        polled = time.monotonic()
                        active = metrics(web).get("borderlink_sip_calls_active", 0)
                        peak[0] = max(peak[0], active)
                    total = sum(sent.values())
                    if total // every > len(samples) - 1:
                        active = metrics(web).get("borderlink_sip_calls_active", 0)
                        samples.append((total, active, rss_kb(proc.pid)))

        def settle() -> bool:
            """The timers end what the fuzzer left: wait for the calls to come back."""
            if proc.poll() is not None:
                return False
            try:
                wait_for(
                    lambda: (
                        (fuzzer.answer_acks() or True)
                        and metrics(web).get("borderlink_sip_calls_active", 0) <= calls_before
                    ),
                    args.ack_timeout + args.media_timeout + 10,
                    "the calls to come back",
                    interval=0.1,
                )
            except AssertionError:
                return False
            return True

        # A warm-up first, longer than the timers: the bank's columns grow to the peak of
        # concurrent calls the fuzzer's INVITEs reach (and stay that size); growth after
        # it, at the same peak, is a leak.
        warmup_seconds = args.ack_timeout + args.media_timeout + 3
        warmup = min(args.count // 2, int(args.rate * warmup_seconds))
        started = time.monotonic()
        fuzz(warmup)
        settle()
        rss_warm = rss_kb(proc.pid) if proc.poll() is None else 0
        fuzz(args.count - warmup)
        fuzz_seconds = time.monotonic() - started
        during = (time.monotonic() - 2.0, time.monotonic())
        crashed = proc.poll() is not None
        back = settle()
        time.sleep(2.5)
        after = (time.monotonic() - 2.0, time.monotonic())
        final = metrics(web) if not crashed else {}
        rss_after = rss_kb(proc.pid) if not crashed else 0
        framing = streams.framing_check() if not crashed else "gateway gone"
        report(
            args,
            sent,
            fuzz_seconds,
            crashed,
            log_path,
            baseline,
            final,
            calls_before,
            back,
            (rss_before, rss_warm, rss_after),
            peak[0],
            live,
            witness,
            (before, during, after),
            samples,
            (framing, streams.refused),
        )
    finally:
        if pacer is not None:
            pacer.stopping.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return 0


def _answers(web: int) -> bool:
    try:
        metrics(web)
        return True
    except OSError:
        return False


def _rtp_port(log_path: Path, web: int) -> int:
    """The gateway's media port: from a probe call's SDP answer."""
    probe = Caller("probe", 400)
    sip = int(
        re.search(r'listen = "127.0.0.1:(\d+)"', (log_path.parent / "site.toml").read_text())[1]
    )
    probe.call(("127.0.0.1", sip), "6001")
    port = probe.remote[1]
    probe.rtp.close()  # gone: the media timeout ends this call during the run
    return port


def report(
    args,
    sent,
    seconds,
    crashed,
    log_path,
    baseline,
    final,
    calls_before,
    back,
    rss,
    peak,
    live,
    witness,
    windows,
    samples,
    stream,
) -> None:  # noqa: ANN001
    log_text = log_path.read_text(errors="replace")
    tracebacks = log_text.count("Traceback (most recent call last)")
    print(
        f"\nfuzz_sip: {sum(sent.values()):,} messages in {seconds:.1f} s "
        f"({sum(sent.values()) / seconds:,.0f}/s), seed {args.seed}\n"
    )
    print(f"{'kind':<22}{'sent':>10}")
    for kind, n in sorted(sent.items()):
        print(f"{kind:<22}{n:>10,}")
    print(
        f"\nTCP: {stream[1]:,} connections refused or reset by the gateway; after the run,"
        f" 3 merged + 1 split OPTIONS on one connection: {stream[0]}"
    )

    def delta(name: str) -> float:
        return final.get(name, 0) - baseline.get(name, 0)

    print("\ngateway counters over the run")
    counted = (
        "malformed",
        "rejected",
        "refused",
        "failed",
        "timed_out",
        "calls_total",
        "connections",
    )
    for name in sorted(set(final) | set(baseline)):
        if any(k in name for k in counted) and delta(name):
            print(f"  {name.removeprefix('borderlink_'):<58}{delta(name):>10,.0f}")
    calls_after = final.get("borderlink_sip_calls_active", float("nan"))
    print("\nresult")
    rows = [
        ("crashes (gateway died)", "yes" if crashed else "0"),
        ("unhandled exceptions (tracebacks in log)", f"{tracebacks}"),
        ("requests answered 500", f"{delta('borderlink_sip_messages_failed_total'):.0f}"),
        (
            "calls before / after (timers ran)",
            f"{calls_before:.0f} / {calls_after:.0f}"
            f"  (left over: {max(0, calls_after - calls_before):.0f})"
            + ("" if back else "  NOT BACK TO THE BASELINE"),
        ),
        ("peak concurrent calls (fuzzer's INVITEs)", f"{peak:.0f}"),
        ("RSS start / after warm-up / end", " / ".join(f"{r / 1024:.1f}" for r in rss) + " MB"),
        ("RSS growth after the warm-up (goal < 5 MB)", f"{(rss[2] - rss[1]) / 1024:+.1f} MB"),
        (
            "RSS growth over the whole run",
            f"{(rss[2] - rss[0]) / 1024:+.1f} MB (columns sized "
            "for the peak of calls stay allocated)",
        ),
    ]
    for label, value in rows:
        print(f"  {label:<44}{value}")
    print("\nRSS over the run (calls up at that moment: the fuzzer's INVITEs until the timers)")
    print("  " + "  ".join(f"{n // 1000:>5}k" for n, _, _ in samples))
    print("  " + "  ".join(f"{c:>6.0f}" for _, c, _ in samples) + "   calls")
    print("  " + "  ".join(f"{r / 1024:>6.1f}" for _, _, r in samples) + "   MB")
    print(
        "\nthe calls' audio, dBFS: the live caller hears the radio (1000 Hz, sent at -12) and"
        " the witness (900 Hz);\nthe witness hears the live caller (600 Hz) and must not hear"
        " the tone injected from the live\ncaller's address under another SSRC (1400 Hz);"
        " 1700 Hz is nobody's: the floor of loss concealment"
    )
    print(
        f"  {'window':<10}{'live: dominant':>15}{'1000':>8}{'900':>8}"
        f"{'witness: 600':>15}{'1400':>8}{'1700':>8}"
    )
    ok = True
    for name, (start, end) in zip(("before", "during", "after"), windows, strict=True):
        heard = live.audio(start, end)
        other = witness.audio(start, end)
        radio, mate = band_db(heard, 1000), band_db(heard, 900)
        own, injected, floor = (band_db(other, hz) for hz in (600, 1400, 1700))
        print(
            f"  {name:<10}{dominant_hz(heard):>15.0f}{radio:>8.1f}{mate:>8.1f}"
            f"{own:>15.1f}{injected:>8.1f}{floor:>8.1f}"
        )
        ok &= abs(radio + 12) < 3 and mate > -25 and own > -25 and injected < own - 30
    print(f"\naudio still right: {'yes' if ok else 'NO'}; gateway log: {log_path}")


if __name__ == "__main__":
    raise SystemExit(main())
