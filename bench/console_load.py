"""Dispatcher console load and latency: what a browser console costs the gateway.

    .venv/bin/python bench/console_load.py            # full tables (about 3 minutes)
    .venv/bin/python bench/console_load.py --quick    # smaller sizes, one latency run

Consoles are aiortc peers in this process, speaking the same HTTP offer/answer and
WebSocket protocol as the page. The gateway runs as ``borderlink run`` in its own
process, so its CPU (from /proc, user+system) is measured apart from the clients';
like any ``borderlink run`` it runs on uvloop (``gateway.site.run_async``; seen in
py-spy stacks), while the client process here uses asyncio's own loop.
Every talkgroup has a tone port talking all the time, so every listener is sent
real encoded audio, never silence packets.

Latency runs in-process (the gateway and one client share a loop) and is measured
by content: a tone burst's onset at the far end against the moment it was sent.

Machines here are shared and noisy: figures are medians over the measuring window
or over repeated bursts; compare them as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import aioice.ice
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from gateway.webrtc.passwords import hash_password
from gateway.webrtc.server import shorten_receive_buffer

aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
print = functools.partial(print, flush=True)  # noqa: A001  (tables appear as they are measured)
PASSWORD = "bench-password"
BORDERLINK = str(Path(sys.executable).parent / "borderlink")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site(
    port: int, shared: bool, direct: bool = True, talkgroups: int = 1, silent: bool = False
) -> str:
    tgs = "\n".join(
        f"""
[ports.tone{i}]
kind = "tone"
tone_hz = {500 + 100 * i}
enabled = {str(not silent).lower()}

[talkgroups.tg{i}]
members = ["tone{i}"]
"""
        for i in range(talkgroups)
    )
    return f"""
[site]
name = "console bench"
country = "US"

[web]
host = "127.0.0.1"
port = {port}

[console]
ice_addresses = ["127.0.0.1"]
shared_encode = {str(shared).lower()}
direct_rtp = {str(direct).lower()}
login_attempts = 100

[console.operators.bench]
password_hash = "{hash_password(PASSWORD, n=2**10)}"
talk = ["*"]
{tgs}
"""


class PacedTone(MediaStreamTrack):
    """A microphone: 20 ms frames at 48 kHz in real time; a tone while ``on``."""

    kind = "audio"

    def __init__(self, hz: float = 1000.0, level: float = 0.25) -> None:
        super().__init__()
        self.hz, self.level = hz, level
        self.on = False
        self.start: float | None = None
        self.n = 0
        self.first_on_sent: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.start is None:
            self.start = time.time()
        due = self.start + self.n * 0.02
        await asyncio.sleep(max(0.0, due - time.time()))
        t = (self.n * 960 + np.arange(960)) / 48000
        samples = self.level * np.sin(2 * np.pi * self.hz * t) if self.on else np.zeros(960)
        if self.on and self.first_on_sent is None:
            self.first_on_sent = time.time()
        frame = av.AudioFrame.from_ndarray(
            (samples * 32767).astype(np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = 48000
        frame.pts = self.n * 960
        frame.time_base = fractions.Fraction(1, 48000)
        self.n += 1
        return frame


class Client:
    """One console page: a session cookie, an event socket and one peer connection."""

    def __init__(self, http: aiohttp.ClientSession, base: str, number: int) -> None:
        self.http, self.base = http, base
        self.console = f"bench{number:08d}"
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.mic: PacedTone | None = None
        self.frames = 0
        self.on_frame = None
        self.tasks: list[asyncio.Task] = []

    async def join(self, talkgroup: str, talk: bool = False, prefetch: int | None = None) -> None:
        self.ws = await self.http.ws_connect(f"{self.base}/api/console/events")
        await self.ws.send_json({"type": "hello", "console": self.console})
        self.tasks.append(asyncio.ensure_future(self._drain_ws()))
        if talk:
            self.mic = PacedTone()
            self.pc.addTrack(self.mic)
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        if prefetch is not None:
            shorten_receive_buffer(self.pc.getTransceivers()[0].receiver, prefetch)
        connected = asyncio.get_running_loop().create_future()

        @self.pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            self.tasks.append(asyncio.ensure_future(self._drain(track)))

        @self.pc.on("connectionstatechange")
        def _state() -> None:
            if self.pc.connectionState == "connected" and not connected.done():
                connected.set_result(True)

        await self.pc.setLocalDescription(await self.pc.createOffer())
        r = await self.http.post(
            f"{self.base}/api/console/join",
            json={"console": self.console, "talkgroup": talkgroup, **self._sdp()},
            timeout=aiohttp.ClientTimeout(total=30),
        )
        r.raise_for_status()
        await self.pc.setRemoteDescription(RTCSessionDescription(**await r.json()))
        await asyncio.wait_for(connected, 20)

    def _sdp(self) -> dict[str, str]:
        return {"type": self.pc.localDescription.type, "sdp": self.pc.localDescription.sdp}

    def sink_media(self) -> bool:
        """Count RTP datagrams instead of decrypting and decoding them.

        One bench process hosts a hundred consoles; decoding each in Python would
        starve the process, miss ICE consent checks and drop calls. STUN and DTLS
        still reach aiortc, so the call stays up; only media is counted and dropped.
        """
        try:
            dtls = self.pc.getTransceivers()[0].receiver.transport
            pair = dtls.transport._connection._nominated[1]
        except (AttributeError, KeyError, IndexError):
            return False
        protocol = pair.protocol
        original = protocol.datagram_received

        def received(data: bytes, addr: tuple) -> None:
            if data and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223:  # RTP, not RTCP
                self.frames += 1
            else:
                original(data, addr)

        protocol.datagram_received = received
        return True

    async def ptt(self, talkgroup: str, on: bool) -> None:
        await self.ws.send_json({"type": "ptt", "talkgroup": talkgroup, "on": on})

    async def _drain(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(Exception):
            while True:
                frame = await track.recv()
                self.frames += 1
                if self.on_frame:
                    self.on_frame(frame)

    async def _drain_ws(self) -> None:
        with contextlib.suppress(Exception):
            async for _ in self.ws:
                pass

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.ws is not None:
            await self.ws.close()
        await self.pc.close()


async def login(base: str) -> aiohttp.ClientSession:
    http = aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), connector=aiohttp.TCPConnector(limit=0)
    )  # a socket per console
    r = await http.post(
        f"{base}/api/console/login", json={"operator": "bench", "password": PASSWORD}
    )
    r.raise_for_status()
    return http


async def packets_sent(http: aiohttp.ClientSession, base: str) -> tuple[float, int]:
    """Packets the gateway says it sent to consoles on tg0 (its /metrics, a counter per
    talkgroup), and how many console legs it has there."""
    text = await (await http.get(f"{base}/metrics")).text()
    sent, legs = 0.0, 0
    for line in text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith('borderlink_console_packets_out_total{talkgroup="tg0"}'):
            sent = float(value)
        elif line.startswith('borderlink_console_talkgroup_seats{talkgroup="tg0"'):
            legs += int(float(value))
    return sent, legs


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def measure_gateway(
    listeners: int,
    talkers: int,
    shared: bool,
    window: float,
    workdir: Path,
    direct: bool = True,
    silent: bool = False,
) -> tuple[float, float]:
    """Gateway CPU (% of one core) with this many consoles on one talkgroup, and the
    share of the packets due that it really sent (a starved machine skips ticks)."""
    port = free_tcp_port()
    config = workdir / f"site-{port}.toml"
    config.write_text(site(port, shared, direct, silent=silent))
    proc = subprocess.Popen(
        [BORDERLINK, "run", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    clients: list[Client] = []
    http = None
    try:
        deadline = time.monotonic() + 120  # imports alone take seconds on a loaded machine
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"'borderlink run {config}' did not start listening")
            await asyncio.sleep(0.1)
        http = await login(base)
        for i in range(listeners + talkers):
            client = Client(http, base, i)
            await client.join("tg0", talk=i >= listeners)
            if i < listeners and not client.sink_media():
                print("  (note: could not bypass client-side decoding; clients may fall behind)")
            clients.append(client)
        for client in clients[listeners:]:
            client.mic.on = True
            await client.ptt("tg0", True)
        await asyncio.sleep(2.0)  # settle: DTLS done, jitter buffers filled
        sent0, legs0 = await packets_sent(http, base)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        frames0 = sum(c.frames for c in clients)
        await asyncio.sleep(window)
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        sent1, legs1 = await packets_sent(http, base)
        sent = sent1 - sent0
        if legs1 != legs0 or legs0 != listeners + talkers:
            print(f"  (calls dropped: {legs0} → {legs1} console legs of {listeners + talkers})")
            return float("nan"), float("nan")
        got = sum(c.frames for c in clients) - frames0
        expected = (listeners + talkers) * (t1 - t0) / 0.02
        if clients and got < 0.9 * sent and not silent:
            print(f"  (note: the clients received {got / sent:.0%} of what the gateway sent)")
        return 100.0 * (c1 - c0) / (t1 - t0), (sent / expected if expected else 1.0)
    finally:
        for client in clients:
            await client.close()
        if http is not None:
            await http.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


PATHS = {  # label: (shared encode, direct RTP)
    "direct+shared": (True, True),
    "aiortc+shared": (True, False),
    "aiortc+own": (False, False),
}


async def cpu_tables(quick: bool, sizes: list[int], labels: list[str]) -> None:
    window = 4.0 if quick else 8.0
    sizes = [1, 10] if quick else sizes
    paths = [(label, *PATHS[label]) for label in labels]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        idle, _ = await measure_gateway(0, 0, True, window, workdir)
        print(
            f"\nGateway CPU with N consoles listening to one talkgroup where a tone talks "
            f"({window:g} s windows; idle site {idle:.1f} % of a core)"
        )
        print("  direct+shared: one encode per tick for the talkgroup, RTP sent directly (default)")
        print("  aiortc+shared: one encode per tick, each packet through aiortc's sender task")
        print("  aiortc+own:    an encoder per console through aiortc (a plain aiortc app)")
        print("  cells: µs of gateway CPU per console per 20 ms frame  [CPU % measured, % of")
        print("  packets due that were sent: below 100 % the machine starved the gateway]")
        print(f"{'N':>5} " + "".join(f"{label:>26}" for label, _, _ in paths))
        for n in sizes:
            cells = []
            for _label, shared, direct in paths:
                if n > 50 and not direct:
                    cells.append(f"{'-':>26}")
                    continue
                cpu, sent = await measure_gateway(n, 0, shared, window, workdir, direct)
                per_frame_us = (cpu - idle) / 100 / (n * 50 * max(sent, 1e-3)) * 1e6
                cells.append(f"{per_frame_us:>9.0f} µs [{cpu:5.1f} %, {sent:4.0%}]")
            print(f"{n:>5} {''.join(cells)}")
        listen, _ = await measure_gateway(1, 0, True, window, workdir)
        talk, _ = await measure_gateway(0, 1, True, window, workdir)
        print(
            f"\nOne console (default paths): listening {listen - idle:.2f} % of a core, "
            f"talking (PTT held, tone sent) {talk - idle:.2f} %"
        )
        n = max(sizes)
        quiet, _ = await measure_gateway(n, 0, True, window, workdir, silent=True)
        print(
            f"{n} consoles on a silent talkgroup (DTX: a packet per 400 ms): {quiet:.1f} % "
            f"of a core, {(quiet - idle) / 100 / (n * 50) * 1e6:.0f} µs per console per "
            "20 ms frame"
        )


# --- latency (in-process) ----------------------------------------------------------------


async def latency(runs: int) -> None:
    from gateway.app import Gateway
    from gateway.config import parse_config
    from gateway.ports import Port
    from gateway.webrtc import rtp as console_rtp

    class Ear(Port):
        """A full-duplex radio: records arrival times of what the gateway sends it."""

        def __init__(self) -> None:
            from gateway.config import PortConfig

            super().__init__("ear", PortConfig(kind="bench_ear"), gateway.config.timing)
            self.heard: list[tuple[float, np.ndarray]] = []
            self.squelch = False
            self.opened: float | None = None
            self.tone = 0.25 * np.sin(2 * np.pi * 700 * np.arange(320) / 16000).astype(np.float32)

        def read(self) -> np.ndarray | None:
            if self.squelch and self.opened is None:
                self.opened = time.time()
            self.talking = self.squelch
            return self.tone if self.squelch else None

        def write(self, frame: np.ndarray | None) -> None:
            if frame is not None:
                self.heard.append((time.time(), frame.copy()))

    port = free_tcp_port()
    gateway = Gateway(parse_config(site(port, True)))
    run = asyncio.ensure_future(gateway.run())
    ear = Ear()
    for _ in range(200):
        if getattr(getattr(gateway, "web", None), "port", None):
            break
        await asyncio.sleep(0.02)
    gateway.engine.attach(ear, "tg0", 0)
    gateway.engine.detach(gateway.ports["tone0"])  # only the burst under test in the mix
    base = f"http://127.0.0.1:{port}"
    http = await login(base)
    client = Client(http, base, 1)
    await client.join("tg0", talk=True, prefetch=1)
    await client.ptt("tg0", True)
    up, down, wire = [], [], []
    sent_at: list[float] = []  # when each non-silent packet left for the wire
    original = console_rtp.RtpOut.send

    def timed_send(self, payload: bytes) -> None:
        original(self, payload)
        if payload != gateway.console.silence:
            sent_at.append(time.time())

    console_rtp.RtpOut.send = timed_send
    for seat in gateway.engine.ports:  # re-bind: a seat keeps the bound method it was given
        if getattr(seat, "direct", None) is not None:
            seat.use_direct(seat.direct)
    try:
        for _ in range(runs):
            # console → radio: the client's tone burst onset at the radio
            await asyncio.sleep(0.5)
            ear.heard.clear()
            client.mic.first_on_sent = None
            client.mic.on = True
            t_end = time.time() + 2
            while time.time() < t_end and not any(np.abs(f).max() > 0.05 for _, f in ear.heard):
                await asyncio.sleep(0.005)
            client.mic.on = False
            for when, frame in ear.heard:
                loud = np.flatnonzero(np.abs(frame) > 0.05)
                if loud.size:
                    up.append(when + loud[0] / 16000 - client.mic.first_on_sent)
                    break
            await asyncio.sleep(0.3)
            # radio → console: the radio's onset in the client's decoded audio
            onset: list[float] = []

            def on_frame(frame: av.AudioFrame, onset: list[float] = onset) -> None:
                data = frame.to_ndarray().reshape(-1)[::2]
                loud = np.flatnonzero(np.abs(data) > 0.05 * 32767)
                if loud.size and not onset:
                    onset.append(time.time() + loud[0] / 48000)

            client.on_frame = on_frame
            await client.ptt("tg0", False)
            await asyncio.sleep(0.3)
            ear.squelch, ear.opened = True, None
            t_end = time.time() + 2
            while time.time() < t_end and not onset:
                await asyncio.sleep(0.005)
            ear.squelch = False
            client.on_frame = None
            if onset and ear.opened:
                down.append(onset[0] - ear.opened)
                first = [t for t in sent_at if t >= ear.opened]
                if first:
                    wire.append(min(first) - ear.opened)
            sent_at.clear()
            await client.ptt("tg0", True)
    finally:
        console_rtp.RtpOut.send = original
        await client.close()
        await http.close()
        gateway.stop()
        await asyncio.wait_for(run, 10)

    def ms(values: list[float]) -> str:
        return (
            f"{statistics.median(values) * 1000:6.1f} ms (min {min(values) * 1000:.1f}, "
            f"max {max(values) * 1000:.1f}, n={len(values)})"
            if values
            else "no data"
        )

    print("\nMouth-to-ear through the gateway, 20 ms frames, aiortc client on loopback")
    print(f"  console → radio (client encode, gateway jitter buffer, decode, tick): {ms(up)}")
    print(f"  radio → console, to decoded audio at a client (prefetch 1):        {ms(down)}")
    print(f"  radio → console, gateway part (tick → Opus packet to the wire):    {ms(wire)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one latency run")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[1, 10, 50, 100],
        help="listener counts for the CPU table",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=list(PATHS),
        default=list(PATHS),
        help="send paths for the CPU table (default: all three)",
    )
    args = parser.parse_args()
    if not shutil.which(BORDERLINK) and not Path(BORDERLINK).exists():
        sys.exit(f"{BORDERLINK} not found: run 'bash .ci/bootstrap setup' first")
    if not args.skip_latency:
        asyncio.run(latency(3 if args.quick else 10))
    if not args.skip_cpu:
        asyncio.run(cpu_tables(args.quick, args.sizes, args.paths))


if __name__ == "__main__":
    main()
