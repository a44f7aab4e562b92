"""What SIP over TCP and TLS costs the gateway, on loopback (bounded: about half a minute).

    .venv/bin/python bench/sip_streams.py
    .venv/bin/python bench/sip_streams.py --handshakes 200 --requests 2000   # quicker

Figures:
* framing: µs of this process's CPU to cut one OPTIONS off a stream fed in 1400-byte
  segments (the framer alone);
* the real gateway in its own process (media clock, engine, SIP service), this
  process a client: the gateway's CPU (all threads, from /proc) per TLS handshake
  (ECDSA P-256, TLS 1.3, no client certificate, and with one), per OPTIONS
  answered over UDP, TCP and TLS on one open connection, one request at a time, and
  per INVITE over UDP read whole and refused (route found, SDP without G.711: 488).
  The gateway's idle cost (the media clock ticking) is measured first and taken off.

The machine is shared: numbers are what one run sees; rerun to compare.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.demo.pki import Authority  # noqa: E402  (the throwaway CA)
from gateway.sip.stream import Framer  # noqa: E402
from tests.conftest import free_port  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def options(cseq: int, transport: str) -> bytes:
    return (
        "OPTIONS sip:6001@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:5999;branch=z9hG4bKbench{cseq}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:bench@127.0.0.1>;tag=b\r\n"
        f"To: <sip:6001@127.0.0.1>\r\nCall-ID: bench@127.0.0.1\r\nCSeq: {cseq} OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def invite(cseq: int) -> bytes:
    """An INVITE to the public route offering only G.722: read whole (route, SDP) and
    refused 488, so each one costs the parse and the call logic but leaves no call."""
    body = (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio 4000 RTP/AVP 9 101\r\na=rtpmap:9 G722/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\na=ptime:20\r\n"
    )
    return (
        "INVITE sip:6001@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKinv{cseq};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:bench@127.0.0.1>;tag=b\r\n"
        f"To: <sip:6001@127.0.0.1>\r\nCall-ID: inv{cseq}@127.0.0.1\r\nCSeq: 1 INVITE\r\n"
        "Contact: <sip:bench@127.0.0.1:5999>\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def framing(count: int) -> float:
    stream = b"".join(options(n, "TCP") for n in range(count))
    framer = Framer(65536, 16384)
    start = time.process_time()
    got = 0
    for i in range(0, len(stream), 1400):
        got += len(framer.feed(stream[i : i + 1400]))
    assert got == count
    return (time.process_time() - start) / count * 1e6


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


SITE = """
[site]
name = "bench"
country = "CA"

[ports.radio]
kind = "simulated_radio"
talk_offset = "1h"

[talkgroups.marine]
members = ["radio"]

[sip]
listen = "127.0.0.1:{udp}"
listen_tcp = "127.0.0.1:{tcp}"
listen_tls = "127.0.0.1:{tls}"
tls_certificate = "{cert}"
tls_key = "{key}"
tls_ca = "{ca}"
max_connections_per_address = 100000
max_connections = 100000
max_connection_rate_per_address = 100000
invite_rate = 100000.0

[sip.routes."6001"]
talkgroup = "marine"
public = true
"""


def read_response(sock) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--handshakes", type=int, default=500)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()

    print(f"framing: {framing(100_000):.2f} µs per message (framer alone)")
    with tempfile.TemporaryDirectory() as tmp:
        ca = Authority(Path(tmp))
        server, client = ca.issue("gateway.test"), ca.issue("phone.test")
        ports = {"udp": free_port(), "tcp": free_port(), "tls": free_port()}
        site = Path(tmp) / "site.toml"
        site.write_text(SITE.format(**ports, cert=server.certificate, key=server.key, ca=ca.bundle))
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", str(site)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", ports["tcp"]), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or gateway.poll() is not None:
                        raise SystemExit("the gateway did not start") from None
                    time.sleep(0.1)
            measure(gateway.pid, ports, ca, client, args)
        finally:
            gateway.terminate()
            gateway.wait(10)


def measure(pid: int, ports: dict[str, int], ca: Authority, client, args) -> None:
    before, wall = cpu_seconds(pid), time.monotonic()
    time.sleep(2)
    idle = (cpu_seconds(pid) - before) / (time.monotonic() - wall)  # CPU s per s

    def cost(run) -> tuple[float, float]:
        """(gateway CPU µs per operation, operations per second), idle cost taken off."""
        before, wall = cpu_seconds(pid), time.monotonic()
        count = run()
        seconds = time.monotonic() - wall
        used = cpu_seconds(pid) - before - idle * seconds
        return max(used, 0.0) / count * 1e6, count / seconds

    plain = ssl.create_default_context(cafile=str(ca.bundle))
    with_cert = ssl.create_default_context(cafile=str(ca.bundle))
    with_cert.load_cert_chain(client.certificate, client.key)

    def handshakes(context: ssl.SSLContext) -> int:
        for _ in range(args.handshakes):
            raw = socket.create_connection(("127.0.0.1", ports["tls"]))
            with context.wrap_socket(raw, server_hostname="gateway.test") as tls:
                tls.sendall(options(1, "TLS"))
                read_response(tls)
        return args.handshakes

    def invites() -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", ports["udp"]))
        codes: dict[bytes, int] = {}
        with sock:
            for n in range(args.requests):
                sock.sendall(invite(n + 1))
                code = sock.recv(4096)[8:11]
                codes[code] = codes.get(code, 0) + 1
        assert set(codes) == {b"488"}, f"INVITEs answered {codes}, not all 488"
        return args.requests

    def requests(kind: str) -> int:
        if kind == "udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(("127.0.0.1", ports["udp"]))
        else:
            sock = socket.create_connection(("127.0.0.1", ports[kind]))
            if kind == "tls":
                sock = plain.wrap_socket(sock, server_hostname="gateway.test")
        with sock:
            for n in range(args.requests):
                sock.sendall(options(n + 1, kind.upper()))
                read_response(sock) if kind != "udp" else sock.recv(4096)
        return args.requests

    print(f"gateway idle (media clock): {idle * 100:.1f} % of a core, taken off below")
    print(f"{'operation':<44} {'gateway CPU':>14} {'rate':>12}")
    rows = [
        ("TLS handshake + 1 OPTIONS, no client cert", lambda: handshakes(plain)),
        ("TLS handshake + 1 OPTIONS, client cert", lambda: handshakes(with_cert)),
        ("OPTIONS answered over UDP", lambda: requests("udp")),
        ("INVITE refused 488 over UDP (route, SDP)", invites),
        ("OPTIONS answered over TCP (one connection)", lambda: requests("tcp")),
        ("OPTIONS answered over TLS (one connection)", lambda: requests("tls")),
    ]
    for name, run in rows:
        micros, rate = cost(run)
        print(f"{name:<44} {micros:>11.0f} µs {rate:>9.0f} /s")


if __name__ == "__main__":
    main()
