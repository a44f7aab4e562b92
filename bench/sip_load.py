"""SIP media load and delay on loopback: how many G.711 legs one core mixes in real time.

    .venv/bin/python bench/sip_load.py                 # the tables (about 2 minutes)
    .venv/bin/python bench/sip_load.py --legs 250 500  # other load sizes
    .venv/bin/python bench/sip_load.py --quick         # a smoke run
    .venv/bin/python bench/sip_load.py --srtp off      # plain RTP only (default: both)
    .venv/bin/python bench/sip_load.py --parts scrape --legs 1250 --srtp off
                                                       # late ticks while /metrics is read

The gateway runs in its own process (the real Gateway: media clock, engine, SIP
service); this process is a bounded load generator on 127.0.0.1, like sipp with
an RTP stream: it sets every leg up with a real INVITE/200/ACK, then streams
G.711 into all of them on a 20 ms absolute schedule (every leg sending audio, all
in one conference talkgroup) for a fixed time, and tears them down with BYE.

Figures, per run:
* CPU per leg: the gateway process's CPU time (all threads) over the window,
  divided by legs × frames — everything: receive, jitter buffer, decode,
  resample, mix, encode, send, SIP idle;
* late ticks (started more than a frame after their deadline) and tick p99;
* added delay phone→radio: a probe leg sends a click every 500 ms into its own
  talkgroup with a tap port; delay = when the click's frame is handed to the
  radio (plus its offset in the frame) minus when the packet reached the
  gateway's socket (its send time on loopback, plus the emulated network delay);
* the same under emulated 30±10 ms jitter with 0/1/5 % loss, with the leg's own
  jitter-buffer gauge (jitter_buffer_seconds) alongside;
* what a Prometheus scrape costs the media clock (``--parts scrape``): the same load
  with /metrics read over HTTP every ``--scrape-every`` seconds (5 s, a usual
  scrape interval) beside a run not scraped; late ticks during a page's build are
  counted apart from the machine's own;
* SRTP's cost: the component and load tables run each size with plain RTP and with
  SRTP (SDES, AES_CM_128_HMAC_SHA1_80) side by side. SDES keys are only accepted
  over TLS, so for the SRTP rows the generator sets its calls up over a TLS
  connection (a throwaway CA from gateway/demo/pki.py) and protects its packets with
  its own pylibsrtp sessions (its CPU is not the gateway's).

The machine is shared: numbers are what one run sees; rerun to compare.
SIP_BENCH_PROFILE=FILE writes a CPU-time profile of the gateway over the last window.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import re
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pylibsrtp import Policy, Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.units import parse_duration  # noqa: E402

CLICK_EVERY = 25  # packets (500 ms)
FRAME_S = 0.020

SITE = """
[site]
name = "sip-bench"
country = "CA"

[ports.radio]
kind = "simulated_radio"
talk_every = "0s"
talk_for = "0s"

[ports.tap]
kind = "bench_tap"

[talkgroups.load]
members = ["radio"]

[talkgroups.probe]
members = ["tap"]

[sip]
listen = "127.0.0.1:0"
# One load generator on one address sets up every leg, as fast as it can.
max_calls = 5000
max_calls_per_source = 5000
invite_rate = 100000.0

[sip.routes."6001"]
talkgroup = "load"
public = true
vox_threshold_dbfs = -50.0

[sip.routes."6002"]
talkgroup = "probe"
public = true
vox_threshold_dbfs = -50.0
vox_hang = "0s"
"""


# --- the gateway process ------------------------------------------------------------------


def gateway_process(conn, tls: str = "", web: bool = False, frame: str = "") -> None:  # noqa: ANN001
    """The gateway; ``tls``: [sip] keys for its TLS listener (certificate and key);
    ``web``: serve /metrics (on a free loopback port); ``frame``: its engine frame, if not
    the default (the callers send 20 ms packets either way)."""
    import asyncio

    from gateway.app import Gateway
    from gateway.config import PortConfig, parse_config
    from gateway.endpoints import ENDPOINTS, Endpoint
    from gateway.ports import Port
    from gateway.site import run_async

    clicks: list[float] = []

    class TapConfig(PortConfig):
        pass

    class Tap(Port):
        """A radio that notes when a click reaches it (wall time of its first sample)."""

        can_talk = False

        def write(self, frame) -> None:  # noqa: ANN001
            if frame is not None:
                hot = np.flatnonzero(np.abs(frame) > 0.3)
                if hot.size:
                    clicks.append(time.time() + hot[0] / self.rate)

    site = SITE.replace('listen = "127.0.0.1:0"\n', f'listen = "127.0.0.1:0"\n{tls}\n')
    if web:
        site += '\n[web]\nhost = "127.0.0.1"\nport = 0\n'
    if frame:
        site += f'\n[timing]\nframe = "{frame}"\n'
    tap = Endpoint("tap", ports={"bench_tap": (TapConfig, Tap)})
    gateway = Gateway(parse_config(site, endpoints=(*ENDPOINTS, tap)))

    async def main() -> None:
        task = asyncio.ensure_future(gateway.run())
        while getattr(gateway, "sip", None) is None or gateway.sip.calls is None:
            await asyncio.sleep(0.01)
        durations = np.zeros(100_000)
        lateness = np.zeros(100_000)  # each tick's start after its deadline
        count = [0]
        inner = gateway.clock.on_tick

        tick_cpu = [0.0]
        building = [0, 0]  # /metrics pages being built now; late ticks seen meanwhile
        longest = [0.0]  # CPU seconds of the longest stretch of page work, between ticks
        late_seen = [gateway.clock.late_ticks]
        if web:
            while getattr(gateway, "metrics", None) is None:
                await asyncio.sleep(0.01)
            metrics = gateway.metrics
            build = metrics.page

            async def counted_page() -> bytes:
                building[0] += 1
                try:
                    return await build()
                finally:
                    building[0] -= 1
                    longest[0] = max(longest[0], metrics.longest_slice)

            metrics.page = counted_page

        def timed_tick() -> None:
            started = time.perf_counter()
            cpu = time.thread_time()
            if gateway.clock.late_ticks != late_seen[0]:  # this tick started late
                if building[0]:
                    building[1] += gateway.clock.late_ticks - late_seen[0]
                late_seen[0] = gateway.clock.late_ticks
            inner()
            tick_cpu[0] += time.thread_time() - cpu
            durations[count[0] % len(durations)] = time.perf_counter() - started
            log = gateway.clock.lateness
            lateness[count[0] % len(lateness)] = log.values[(log.count - 1) % len(log.values)]
            count[0] += 1

        gateway.clock.on_tick = timed_tick

        def packets_in() -> int:
            bank = gateway.sip.bank
            return int(bank.table.packets_in[bank.table.active].sum())

        def bank_cpu() -> dict[str, float]:
            bank = gateway.sip.bank
            return {
                **bank.cpu_seconds,
                "recvmmsg": bank.receiver.syscall_seconds,
                "sendmmsg": bank.sender.syscall_seconds,
            }

        while web and (gateway.web is None or not gateway.web.port):
            await asyncio.sleep(0.01)
        web_port = gateway.web.port if web else 0
        conn.send(("ready", gateway.sip.port, gateway.sip.transport.port_for("tls"), web_port))
        marks = {}
        profiler = None
        while True:
            while not conn.poll():
                await asyncio.sleep(0.01)
            message = conn.recv()
            if message == "start":
                if os.environ.get("SIP_BENCH_PROFILE"):
                    import cProfile

                    profiler = cProfile.Profile(time.process_time)
                    profiler.enable()
                clicks.clear()
                longest[0] = 0.0
                marks = {
                    "packets": packets_in(),
                    "wall": time.monotonic(),
                    "skipped": gateway.clock.skipped_ticks,
                    "cpu": time.process_time(),
                    "tick_cpu": tick_cpu[0],
                    "bank_cpu": bank_cpu(),
                    "late": gateway.clock.late_ticks,
                    "late_building": building[1],
                    "ticks": gateway.clock.ticks,
                    "n": count[0],
                }
                conn.send("started")
            elif message == "stop":
                if os.environ.get("SIP_BENCH_PROFILE"):
                    profiler.disable()
                    profiler.dump_stats(os.environ["SIP_BENCH_PROFILE"])
                ticks = gateway.clock.ticks - marks["ticks"]
                window = durations[marks["n"] % len(durations) : count[0] % len(durations)]
                legs = [d.leg for d in gateway.sip.calls.dialogs.values() if d.leg]
                probe = [leg.stats() for leg in legs if "6002" in leg.name]
                conn.send(
                    {
                        "cpu": time.process_time() - marks["cpu"],
                        "tick_cpu": tick_cpu[0] - marks["tick_cpu"],
                        "bank_cpu": {k: v - marks["bank_cpu"][k] for k, v in bank_cpu().items()},
                        "wall": time.monotonic() - marks["wall"],
                        "packets": packets_in() - marks["packets"],
                        "skipped": gateway.clock.skipped_ticks - marks["skipped"],
                        "ticks": ticks,
                        "late": gateway.clock.late_ticks - marks["late"],
                        "late_building": building[1] - marks["late_building"],
                        "longest_slice": longest[0],
                        "late_max": float(
                            lateness[marks["n"] % len(lateness) : count[0] % len(lateness)].max(
                                initial=0.0
                            )
                        ),
                        "tick_p50": float(np.median(window)) if window.size else 0.0,
                        "tick_p99": float(np.percentile(window, 99)) if window.size else 0.0,
                        "legs": len(legs),
                        "clicks": list(clicks),
                        "probe": probe[0] if probe else {},
                    }
                )
            elif message == "quit":
                break
        gateway.stop()
        await task

    run_async(main())


# --- the load generator ---------------------------------------------------------------------


def branch() -> str:
    return f"z9hG4bK{random.getrandbits(64):x}"


class Caller:
    """A minimal UAC on one SIP socket: INVITE/ACK/BYE per leg, no retransmission (loopback).

    With ``tls`` (the gateway's TLS port and the CA file) it calls over one TLS
    connection and offers SRTP (RTP/SAVP with an SDES key) on the load route."""

    def __init__(self, gateway_port: int, tls: tuple[int, str] | None = None) -> None:
        self.srtp = tls is not None
        self.transport = "TLS" if tls else "UDP"
        self.gateway = ("127.0.0.1", tls[0] if tls else gateway_port)
        if tls:
            context = ssl.create_default_context(cafile=tls[1])
            context.check_hostname = False  # the certificate is checked against the CA
            raw = socket.create_connection(self.gateway, timeout=5)
            self.sip = context.wrap_socket(raw)
        else:
            self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sip.bind(("127.0.0.1", 0))
            self.sip.settimeout(5)
        self.port = self.sip.getsockname()[1]
        self.buffer = b""
        self.calls: list[dict] = []

    def _send(self, data: bytes) -> None:
        if self.srtp:
            self.sip.sendall(data)
        else:
            self.sip.sendto(data, self.gateway)

    def _receive(self) -> str:
        """One SIP message (over TLS: framed by its Content-Length)."""
        if not self.srtp:
            return self.sip.recv(65535).decode()
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._read()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = re.search(rb"^Content-Length:\s*(\d+)", head, re.M | re.I)
        size = int(length.group(1)) if length else 0
        while len(rest) < size:
            rest += self._read()
        self.buffer = rest[size:]
        return (head + b"\r\n\r\n" + rest[:size]).decode()

    def _read(self) -> bytes:
        data = self.sip.recv(65535)
        if not data:
            raise ConnectionError("the gateway closed the SIP connection")
        return data

    def invite(self, number: str, rtp: socket.socket) -> dict:
        from gateway.sip.srtp import new_crypto

        n = len(self.calls)
        call_id = f"bench{n}-{random.getrandbits(32)}@127.0.0.1"
        rtp_port = rtp.getsockname()[1]
        key = new_crypto(1) if self.srtp and number == "6001" else None  # the probe: plain
        body = (
            f"v=0\r\no=bench {n} 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {rtp_port} RTP/{'SAVP' if key else 'AVP'} 0\r\na=rtpmap:0 PCMU/8000\r\n"
            + (f"{key.attribute()}\r\n" if key else "")
            + "a=ptime:20\r\n"
        )
        head = (
            f"INVITE sip:{number}@127.0.0.1:{self.gateway[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/{self.transport} 127.0.0.1:{self.port};branch={branch()}\r\n"
            f"From: <sip:load{n}@127.0.0.1>;tag=t{n}\r\nTo: <sip:{number}@127.0.0.1>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:load{n}@127.0.0.1:{self.port};transport={self.transport.lower()}>"
            "\r\nMax-Forwards: 70\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self._send((head + body).encode())
        while True:
            data = self._receive()
            if call_id in data and " INVITE" in data and not data.startswith("SIP/2.0 1"):
                break
        status = int(data.split(" ", 2)[1])
        if status != 200:
            raise RuntimeError(f"gateway refused leg {n}: {data.splitlines()[0]}")
        to = re.search(r"^To: (.+)$", data, re.M).group(1).strip()
        port = int(re.search(r"^m=audio (\d+)", data, re.M).group(1))
        call = {"call_id": call_id, "to": to, "n": n, "port": port, "protect": None}
        if key is not None:
            if "a=crypto:1 " not in data:
                raise RuntimeError(f"gateway answered leg {n} without SRTP keys")
            policy = Policy(key.key, ssrc_type=Policy.SSRC_ANY_OUTBOUND)
            call["protect"] = Session(policy).protect
        self._send_in_dialog("ACK", call, 1)
        self.calls.append(call)
        return call

    def _send_in_dialog(self, method: str, call: dict, cseq: int) -> None:
        n = call["n"]
        self._send(
            (
                f"{method} sip:borderlink@127.0.0.1:{self.gateway[1]} SIP/2.0\r\n"
                f"Via: SIP/2.0/{self.transport} 127.0.0.1:{self.port};branch={branch()}\r\n"
                f"From: <sip:load{n}@127.0.0.1>;tag=t{n}\r\nTo: {call['to']}\r\n"
                f"Call-ID: {call['call_id']}\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
        )

    def hangup_all(self) -> None:
        self.sip.settimeout(0.5)
        for call in self.calls:
            self._send_in_dialog("BYE", call, 2)
        with __import__("contextlib").suppress(OSError):
            while self.sip.recv(65535):
                pass
        self.calls.clear()
        if self.srtp:
            self.sip.close()


def tls_material(directory: Path) -> tuple[str, str]:
    """[sip] keys for a TLS listener with a throwaway CA's certificate, and the CA file."""
    from gateway.demo.pki import Authority  # the throwaway CA

    ca = Authority(directory)
    issued = ca.issue("gateway.bench")
    keys = (
        'listen_tls = "127.0.0.1:0"\n'
        f'tls_certificate = "{issued.certificate}"\ntls_key = "{issued.key}"'
    )
    return keys, str(ca.bundle)


def ulaw_frames() -> tuple[bytes, bytes, bytes]:
    from gateway.codecs.g711 import ulaw_encode

    t = np.arange(160) / 8000
    tone = ulaw_encode((0.1 * 32767 * np.sin(2 * np.pi * 500 * t)).astype(np.int16)).tobytes()
    silence = ulaw_encode(np.zeros(160, np.int16)).tobytes()
    click = np.zeros(160, np.int16)
    click[:4] = 30000
    return tone, silence, ulaw_encode(click).tobytes()


def run_window(
    conn,
    legs: list[tuple[socket.socket, tuple[str, int], Callable | None]],
    probe: tuple[socket.socket, tuple[str, int]] | None,
    seconds: float,
    jitter_ms: float = 0.0,
    loss: float = 0.0,
    seed: int = 1,
    scrape: tuple[int, float] | None = None,
) -> dict:
    """Stream for ``seconds``; returns the gateway's figures and the probe's click delays.
    ``scrape``: (web port, seconds) to read /metrics that often meanwhile, as Prometheus."""
    tone, silence, click = ulaw_frames()
    rng = np.random.default_rng(seed)
    header = struct.Struct("!BBHII")
    n_frames = int(seconds / FRAME_S)
    seqs = [random.getrandbits(16) for _ in legs]
    ssrcs = [random.getrandbits(32) for _ in legs]
    packet = bytearray(12 + 160)
    packet[12:] = tone
    # SRTP legs' packets are protected before the window: the generator shares the
    # machine with the gateway, and its own encryption must not take the gateway's CPU.
    protected = {}
    for i, (_, _, protect) in enumerate(legs):
        if protect is not None:
            frames = []
            for k in range(n_frames):
                ts = (k * 160) & 0xFFFFFFFF
                header.pack_into(packet, 0, 0x80, 0, (seqs[i] + k) & 0xFFFF, ts, ssrcs[i])
                frames.append(protect(bytes(packet)))
            protected[i] = frames
    conn.send("start")
    assert conn.recv() == "started"
    scraper = Scraper(*scrape) if scrape else None
    start = time.time() + 0.05
    pending: list[tuple[float, float, bytes]] = []  # (due, nominal, packet) for the probe
    arrivals: dict[float, float] = {}  # click nominal time → when it reached the gateway
    probe_seq = 0
    for k in range(n_frames):
        due = start + k * FRAME_S
        if probe is not None:
            is_click = k % CLICK_EVERY == 0
            payload = click if is_click else silence
            data = header.pack(0x80, 0, probe_seq & 0xFFFF, (k * 160) & 0xFFFFFFFF, 0xB0B) + payload
            probe_seq += 1
            delay = rng.uniform(-jitter_ms, jitter_ms) / 1000 + (0.030 if jitter_ms else 0.0)
            if rng.random() >= loss:
                pending.append((due + delay, due if is_click else -1.0, data))
        while True:  # send what the emulated network delivers before this tick's deadline
            pending.sort()
            while pending and pending[0][0] <= time.time():
                when, nominal, data = pending.pop(0)
                probe[0].sendto(data, probe[1])
                if nominal >= 0:
                    arrivals[nominal] = time.time()
            wait = due - time.time()
            if wait <= 0:
                break
            next_probe = pending[0][0] - time.time() if pending else wait
            time.sleep(max(0.0, min(wait, next_probe, 0.002)))
        ts = (k * 160) & 0xFFFFFFFF
        for i, (sock, address, _) in enumerate(legs):
            if i in protected:
                sock.sendto(protected[i][k], address)
                continue
            header.pack_into(packet, 0, 0x80, 0, (seqs[i] + k) & 0xFFFF, ts, ssrcs[i])
            sock.sendto(packet, address)
    flush_until = time.time() + 0.3
    while pending and time.time() < flush_until:
        when, nominal, data = pending.pop(0)
        time.sleep(max(0.0, when - time.time()))
        probe[0].sendto(data, probe[1])
        if nominal >= 0:
            arrivals[nominal] = time.time()
    time.sleep(0.3)  # the last clicks leave the jitter buffer
    if scraper is not None:
        scraper.stop()
    conn.send("stop")
    result = conn.recv()
    result["scrapes"] = len(scraper.took) if scraper else 0
    result["scrapes_failed"] = scraper.failed if scraper else 0
    result["scrape_ms"] = float(np.median(scraper.took)) * 1e3 if scraper and scraper.took else 0.0
    delays = []
    sent = sorted(arrivals.values())
    for heard in result["clicks"]:
        before = [s for s in sent if heard - 0.4 < s <= heard + 0.001]
        if before:
            delays.append(heard - before[-1])
    result["delays_ms"] = np.array(delays) * 1000
    result["clicks_sent"] = len(sent)
    return result


class Scraper(threading.Thread):
    """Reads /metrics every ``every`` seconds, as Prometheus does, until stopped."""

    def __init__(self, port: int, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.every = f"http://127.0.0.1:{port}/metrics", every
        self.took: list[float] = []
        self.failed = 0  # reads that got no page within Prometheus's usual 10 s timeout
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(self.every):
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    response.read()
            except OSError:  # timed out or refused: a scrape Prometheus would count as failed
                self.failed += 1
                continue
            self.took.append(time.monotonic() - started)

    def stop(self) -> None:
        self.done.set()
        self.join(15)


def open_legs(
    caller: Caller, number: str, count: int
) -> list[tuple[socket.socket, tuple[str, int], Callable | None]]:
    legs = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # we never read it back
        call = caller.invite(number, sock)
        legs.append((sock, ("127.0.0.1", call["port"]), call["protect"]))
    return legs


def jitter_buffer_alone(jitter_ms: float, loss: float, seconds: float = 60.0, seed: int = 3):
    """The real JitterBank fed simulated arrivals (no sockets, no scheduler noise).

    Returns per-packet buffer delays (arrival → start of its playout, ms), late
    packets, concealed samples, lost packets.
    """
    from gateway.codecs.g711 import ulaw_encode

    from gateway.sip.bank import DECODE
    from gateway.sip.jitter import JitterBank

    frame = 160
    rng = np.random.default_rng(seed)
    bank = JitterBank(1, frame)
    n = int(seconds / FRAME_S)
    payload = memoryview(ulaw_encode(np.zeros(frame, np.int16)).tobytes())
    network = 8 * (30.0 + rng.uniform(-jitter_ms, jitter_ms, n)) if jitter_ms else np.zeros(n)
    phase = 8 * rng.uniform(0, 20)  # where packets fall between ticks
    arrival = np.arange(n) * frame + frame + network + phase
    lost = rng.random(n) < loss
    order = np.argsort(arrival, kind="stable")
    played_at: dict[int, float] = {}
    i = 0
    rows, talking, law = np.array([0]), np.array([True]), np.zeros(1, np.int64)
    for k in range(n + 50):
        now = k * frame + 0.0
        while i < n and arrival[order[i]] <= now:
            p = order[i]
            i += 1
            if not lost[p]:
                bank.put(0, p * frame, payload, float(arrival[p]))
        start = int(bank.play[0]) if bank.started[0] else None
        bank.playout(rows, now, talking, DECODE, law)
        if start is not None or bank.started[0]:
            first = int(bank.play[0]) - frame  # what was just played
            if first % frame == 0:
                played_at.setdefault(first // frame, now)
    kept = [p for p in range(n) if not lost[p] and p in played_at][100:]
    waited = np.array([(played_at[p] - arrival[p]) / 8 for p in kept])
    fastest = network.min() + phase
    beyond = np.array([(played_at[p] - (p * frame + frame) - fastest) / 8 for p in kept])
    return waited, beyond, bank.packets_late[0], int(bank.concealed[0]), int(lost.sum())


def components(count: int, frames: int = 250, srtp: bool = False) -> dict[str, float]:
    """CPU µs per leg per frame of each SIP media step, in this process, real sockets.

    Packets are sent from here first (not timed), then each step of the bank is
    timed with the process CPU clock: reading (recvmmsg + checks + jitter bank writes),
    playout (jitter buffer + decode + 8→16 kHz + VOX), send (16→8 kHz + encode +
    headers + sendmmsg). The engine's own per-port cost is in bench/run.py. ``srtp``:
    every leg SRTP (the peers protect here, outside the timed steps).
    """
    from threadpoolctl import threadpool_limits

    from gateway.sip.bank import LegBank
    from gateway.sip.legmedia import LegMedia
    from gateway.sip.srtp import LegSrtp, new_crypto

    threadpool_limits(limits=1, user_api="blas")  # as the SIP service does in the gateway
    bank = LegBank(16000, 320, FRAME_S, capacity=count)
    peers = []
    for _ in range(count):
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        theirs, ours = new_crypto(), new_crypto()
        keys = LegSrtp(theirs.key, ours.key) if srtp else None
        bank.add(LegMedia(payload_type=0, dtmf_type=101, remote=peer.getsockname(), srtp=keys))
        policy = Policy(theirs.key, ssrc_type=Policy.SSRC_ANY_OUTBOUND)
        peers.append((peer, ("127.0.0.1", bank.port), Session(policy).protect if srtp else None))
    tone, _, _ = ulaw_frames()
    header = struct.Struct("!BBHII")
    packet = bytearray(12 + 160)
    packet[12:] = tone
    spent = {"read": 0.0, "playout": 0.0, "send": 0.0}
    start = time.monotonic()
    for k in range(frames):
        for i, (peer, address, protect) in enumerate(peers):
            header.pack_into(packet, 0, 0x80, 0, k & 0xFFFF, k * 160, i)
            peer.sendto(protect(bytes(packet)) if protect else packet, address)
        t0 = time.process_time()
        bank.receive_path.drain()
        t1 = time.process_time()
        bank.receive()
        bank.table.tx[bank.table.active] = 0.1
        bank.table.tx_has[bank.table.active] = True
        t2 = time.process_time()
        bank.send()
        t3 = time.process_time()
        if k >= 20:
            spent["read"] += t1 - t0
            spent["playout"] += t2 - t1
            spent["send"] += t3 - t2
        next_tick = start + (k + 1) * FRAME_S
        time.sleep(max(0.0, next_tick - time.monotonic()))
    if bank.table.malformed["srtp_auth"] or bank.table.malformed["srtp_replay"]:
        raise RuntimeError(f"SRTP packets refused in the bench: {bank.table.malformed}")
    bank.close()
    for peer, *_ in peers:
        peer.close()
    return {name: value / ((frames - 20) * count) * 1e6 for name, value in spent.items()}


def pct(values: np.ndarray, q: float) -> str:
    return f"{np.percentile(values, q):6.1f}" if len(values) else "   n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--legs", type=int, nargs="*", default=[250, 500, 750, 1000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per load size; the median row is printed too"
    )
    parser.add_argument(
        "--parts",
        nargs="*",
        choices=["components", "jitter", "delay", "load", "scrape"],
        default=["components", "jitter", "delay", "load"],
        help="which tables to print (default: all but scrape)",
    )
    parser.add_argument(
        "--scrape-every", type=float, default=5.0, help="scrape table: seconds between reads"
    )
    parser.add_argument("--components", type=int, nargs="*", default=[100, 300, 750])
    parser.add_argument(
        "--srtp",
        choices=["off", "on", "both"],
        default="both",
        help="component and load tables with plain RTP, SRTP, or both side by side",
    )
    args = parser.parse_args()
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.srtp]
    if args.quick:
        args.legs, args.seconds, args.components = [100], 3.0, [100]
    ctx = mp.get_context("spawn")
    print(
        f"SIP media bench on {os.cpu_count()} cores, {args.seconds:g} s windows, 20 ms frames, "
        "gateway in its own process (uvloop), generator here"
    )

    if args.components and "components" in args.parts:
        print(
            "\nSIP media steps alone, CPU µs per leg per frame (this process, real sockets; "
            "the engine's per-port cost is in bench/run.py)"
        )
        print(
            f"{'legs':>6}{'SRTP':>6}{'read':>8}{'playout':>9}{'send':>8}{'total':>8}"
            f"{'load avg':>10}"
        )
        for count in args.components:
            for srtp in modes:
                cost = components(count, srtp=srtp)
                print(
                    f"{count:>6}{'on' if srtp else 'off':>6}{cost['read']:>8.1f}"
                    f"{cost['playout']:>9.1f}{cost['send']:>8.1f}"
                    f"{sum(cost.values()):>8.1f}{os.getloadavg()[0]:>10.1f}"
                )

    if "jitter" in args.parts:
        jitter_table()
    if "delay" in args.parts:
        delay_table(ctx, args.seconds)
    if "load" in args.parts:
        load_table(ctx, args.legs, args.seconds, args.repeat, modes)
    if "scrape" in args.parts:
        scrape_table(ctx, args.legs, args.seconds, args.scrape_every, args.repeat)
    return 0


def jitter_table() -> None:
    print(
        "\nJitter buffer alone: the real JitterBank fed simulated arrivals, 8 tick phases × 12 s "
        "(goal at 30±10 ms: ≤ 50/55/60 ms at 0/1/5 % loss)"
    )
    print(
        "(waited: a packet's arrival → its first sample played; beyond fastest: playout delay"
        " over the fastest packet's — what the buffer adds to the network's best case)"
    )
    print(
        f"{'network':<24}{'waited p50':>11}{'p99':>6}{'beyond fastest p50':>20}{'p99':>6}"
        f"{'late':>6}{'lost':>6}{'concealed':>11}"
    )
    for label, jitter, loss in [
        ("no jitter", 0.0, 0.0),
        ("30±10 ms, 0% loss", 10.0, 0.0),
        ("30±10 ms, 1% loss", 10.0, 0.01),
        ("30±10 ms, 5% loss", 10.0, 0.05),
    ]:
        runs = [jitter_buffer_alone(jitter, loss, seconds=12.0, seed=seed) for seed in range(8)]
        waited = np.concatenate([r[0] for r in runs])
        beyond = np.concatenate([r[1] for r in runs])
        late, concealed, lost = (sum(r[i] for r in runs) for i in (2, 3, 4))
        print(
            f"{label:<24}{pct(waited, 50):>11}{pct(waited, 99):>6}{pct(beyond, 50):>20}"
            f"{pct(beyond, 99):>6}{late:>6}{lost:>6}{concealed:>11}"
        )


def delay_table(ctx, seconds: float) -> None:  # noqa: ANN001 - a multiprocessing context
    print(
        "\nAdded delay phone→radio (probe leg, click every 500 ms; arrival at the gateway → "
        "frame handed to the radio)"
    )
    print(
        f"{'network':<24}{'clicks':>7}{'p50 ms':>8}{'p99 ms':>8}{'jb gauge ms':>13}"
        f"{'late':>6}{'concealed':>11}"
    )
    cases = [
        ("no jitter", 0.0, 0.0),
        ("30±10 ms, 0% loss", 10.0, 0.0),
        ("30±10 ms, 1% loss", 10.0, 0.01),
        ("30±10 ms, 5% loss", 10.0, 0.05),
    ]
    for label, jitter, loss in cases:
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=gateway_process, args=(child,), daemon=True)
        proc.start()
        _, port, _, _ = conn.recv()
        caller = Caller(port)
        probe = open_legs(caller, "6002", 1)[0]
        result = run_window(conn, [], probe, max(seconds, 6.0), jitter, loss)
        stats = result["probe"]
        d = result["delays_ms"]
        print(
            f"{label:<24}{len(d):>7}{pct(d, 50):>8}{pct(d, 99):>8}"
            f"{stats.get('jitter_buffer_seconds', 0) * 1000:>13.1f}"
            f"{stats.get('packets_late', 0):>6}{stats.get('concealed_samples', 0):>11}"
        )
        caller.hangup_all()
        conn.send("quit")
        proc.join(10)


def load_table(  # noqa: ANN001 - a multiprocessing context
    ctx, counts: list[int], seconds: float, repeat: int = 1, modes: list[bool] | None = None
) -> None:
    print(
        "\nConcurrent legs, every leg sending G.711 into one conference talkgroup "
        "(goal: ≥ 750 legs per core, zero late ticks, ≤ 25 µs CPU per leg per frame)"
    )
    print(
        "(µs/leg/frame = gateway CPU ÷ RTP packets received; 'ticks run' and 'pkts in' are the"
        " share of the window's ticks and packets that happened: below 100 % the machine, not"
        " only the gateway, was short of CPU — see the load average)"
    )
    print(
        "(split, µs per leg per tick run: SIP receive | engine | SIP send | outside the tick"
        " (event loop, SIP signalling, timers); 'in syscalls': the part of rx+tx spent inside"
        " recvmmsg/sendmmsg — on loopback sendmmsg also delivers into the peer's socket)"
    )
    print(
        f"{'legs':>6}{'SRTP':>5}{'CPU % core':>11}{'µs/leg/frame':>14}{'ticks run':>11}"
        f"{'pkts in':>9}"
        f"{'late':>6}{'tick p50 ms':>12}{'tick p99 ms':>12}{'probe p50 ms':>13}{'load avg':>9}"
        f"   {'rx':>5}{'engine':>7}{'tx':>5}{'other':>6}{'in syscalls':>12}"
    )
    for count in counts:
        for srtp in modes or [False]:
            rows = [load_run(ctx, count, seconds, srtp) for _ in range(repeat)]
            for row in rows:
                print_load_row(count, row, "", srtp)
            if repeat > 1:
                median = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
                print_load_row(count, median, "median", srtp)


def scrape_table(ctx, counts: list[int], seconds: float, every: float, repeat: int) -> None:  # noqa: ANN001
    print(
        f"\nLate ticks while Prometheus reads /metrics every {every:g} s (plain RTP, every leg "
        "sending G.711 into one talkgroup; goal: no tick late because of a scrape)"
    )
    print(
        f"{'legs':>6}{'scraped':>9}{'scrapes':>8}{'failed':>7}{'scrape ms':>10}{'ticks':>7}"
        f"{'late':>6}"
        f"{'late in a scrape':>17}{'worst late ms':>14}{'tick p99 ms':>12}{'longest slice ms':>17}"
        f"{'CPU % core':>11}{'load avg':>9}"
    )
    for count in counts:
        for _ in range(repeat):
            for scraped in (False, True):
                r = load_run(ctx, count, seconds, scrape=every if scraped else None)
                print(
                    f"{count:>6}{'yes' if scraped else 'no':>9}{r['scrapes']:>8.0f}"
                    f"{r['scrapes_failed']:>7.0f}{r['scrape_ms']:>10.1f}{r['ticks']:>7.0f}"
                    f"{r['late']:>6.0f}"
                    f"{r['late_building']:>17.0f}{r['late_max']:>14.1f}{r['tick_p99']:>12.2f}"
                    f"{r['longest_slice']:>17.2f}"
                    f"{r['cpu_share']:>10.0f}%{r['load']:>9.1f}"
                )
    print(
        "late: ticks that started more than a frame after their deadline; late in a scrape:"
        " those while a /metrics page was being built; worst late: the latest tick start;"
        " failed: reads with no page within 10 s; longest slice: CPU time of the longest"
        " stretch of page work the loop ran without a break (each starts right after a tick"
        " and stops a quarter frame, 5 ms, before the next: it cannot make a tick late"
        " unless it runs over);"
        " scrape ms: one read, request to last byte (median). Late ticks of the unscraped"
        " row are the machine's own (it is shared): compare the two rows."
    )


def load_run(  # noqa: ANN001 - a multiprocessing context
    ctx,
    count: int,
    seconds: float,
    srtp: bool = False,
    scrape: float | None = None,
    frame: str = "",
) -> dict[str, float]:
    """One window at ``count`` legs in a fresh gateway process; the row's figures.
    ``scrape``: read /metrics every that many seconds meanwhile; ``frame``: the gateway's
    engine frame ("10ms"), if not the default."""
    conn, child = ctx.Pipe()
    with tempfile.TemporaryDirectory() as pki:
        keys, cafile = tls_material(Path(pki)) if srtp else ("", "")
        proc = ctx.Process(
            target=gateway_process, args=(child, keys, bool(scrape), frame), daemon=True
        )
        proc.start()
        _, port, tls_port, web_port = conn.recv()
        caller = Caller(port, (tls_port, cafile) if srtp else None)
        every = (web_port, scrape) if scrape else None
        tick = parse_duration(frame) if frame else FRAME_S
        row = load_window(conn, caller, count, seconds, every, tick)
    conn.send("quit")
    proc.join(10)
    return row


def load_window(  # noqa: ANN001 - a Connection
    conn,
    caller: Caller,
    count: int,
    seconds: float,
    scrape: tuple[int, float] | None = None,
    tick: float = FRAME_S,
) -> dict[str, float]:
    """Set ``count`` legs up, stream for ``seconds``, hang up; the row's figures
    (``tick``: the gateway's engine frame, seconds)."""
    probe = open_legs(caller, "6002", 1)[0]
    legs = open_legs(caller, "6001", count)
    time.sleep(1.0)  # let the calls settle (answer retransmission timers, ACKs)
    result = run_window(conn, legs, probe, seconds, scrape=scrape)
    expected = result["wall"] / tick
    per_tick = 1e6 / max(result["ticks"] * (count + 1), 1)
    rx, tx = (result["bank_cpu"][k] * per_tick for k in ("receive", "send"))
    d = result["delays_ms"]
    row = {
        "cpu_share": result["cpu"] / result["wall"] * 100,
        "per_leg": result["cpu"] / max(result["packets"], 1) * 1e6,
        "ticks_run": result["ticks"] / expected * 100,
        "packets": result["packets"] / (result["wall"] / FRAME_S * (count + 1)) * 100,
        "late": result["late"],
        "ticks": result["ticks"],
        "late_building": result["late_building"],
        "late_max": result["late_max"] * 1e3,
        "scrapes": result["scrapes"],
        "scrapes_failed": result["scrapes_failed"],
        "longest_slice": result["longest_slice"] * 1e3,
        "scrape_ms": result["scrape_ms"],
        "tick_p50": result["tick_p50"] * 1e3,
        "tick_p99": result["tick_p99"] * 1e3,
        "probe_p50": float(np.percentile(d, 50)) if len(d) else float("nan"),
        "load": os.getloadavg()[0],
        "rx": rx,
        "engine": result["tick_cpu"] * per_tick - rx - tx,
        "tx": tx,
        "other": (result["cpu"] - result["tick_cpu"]) * per_tick,
        "syscalls": (result["bank_cpu"]["recvmmsg"] + result["bank_cpu"]["sendmmsg"]) * per_tick,
    }
    caller.hangup_all()
    for sock, *_ in legs:
        sock.close()
    return row


def print_load_row(count: int, r: dict[str, float], label: str, srtp: bool = False) -> None:
    print(
        f"{count:>6}{'on' if srtp else 'off':>5}{r['cpu_share']:>10.0f}%{r['per_leg']:>14.1f}"
        f"{r['ticks_run']:>10.0f}%"
        f"{r['packets']:>8.0f}%{r['late']:>6.0f}{r['tick_p50']:>12.2f}{r['tick_p99']:>12.2f}"
        f"{r['probe_p50']:>13.1f}{r['load']:>9.1f}"
        f"   {r['rx']:>5.1f}{r['engine']:>7.1f}{r['tx']:>5.1f}{r['other']:>6.1f}"
        f"{r['syscalls']:>12.1f}  {label}"
    )


if __name__ == "__main__":
    sys.exit(main())
