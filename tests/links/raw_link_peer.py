"""A link peer written by hand for the tests: SIP over TLS with the peer site's
certificate, one dialog, SRTP with its own keys, Opus at a payload type of the
test's choosing — what another vendor's gateway (or a later BorderLink) may send.

It dials a shared name at a gateway, answers the gateway's in-dialog requests
(keepalive OPTIONS, INFO, BYE) with 200, can send a re-INVITE, speaks a tone as
Opus every 20 ms and keeps every RTP packet it receives (decrypted with the
gateway's key). Only loopback; the sender stops with :meth:`close`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import ssl
import struct
from pathlib import Path

import numpy as np
import opuslib_next
from pylibsrtp import Policy, Session

SUITE = "AES_CM_128_HMAC_SHA1_80"
CLOCK = 48000
PACKET = 960  # 20 ms at 48 kHz
DECODE_RATE = 16000  # what the test listens at (the gateway's playback rate)
_HEADER = struct.Struct("!BBHII")


class RawLinkPeer:
    def __init__(self, site: str, certificate: Path, key: Path, opus_type: int, hz: float) -> None:
        self.site = site
        self.opus_type = opus_type
        self.hz = hz
        self.context = ssl.create_default_context()
        self.context.load_cert_chain(certificate, key)
        self.ours = secrets.token_bytes(30)  # our SDES master key and salt
        self.tx = Session(Policy(self.ours, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
        self.rx: Session | None = None
        self.ssrc = secrets.randbits(32)
        self.seq = secrets.randbits(16)
        self.ts = secrets.randbits(32)
        self.call_id = f"{secrets.token_hex(8)}@127.0.0.1"
        self.tag = secrets.token_hex(6)
        self.remote_tag = ""
        self.cseq = 1
        self.version = 1
        self.encoder = opuslib_next.Encoder(CLOCK, 1, "audio")
        self.encoder.bitrate = 48000
        self.sent = 0
        self.received: list[tuple[float, int, bytes]] = []  # (time, payload type, payload)
        self.requests: list[str] = []  # methods the gateway sent us in the dialog
        self.responses: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self.media_to: tuple[str, int] | None = None
        self._tasks: list[asyncio.Task] = []

    # --- signalling -------------------------------------------------------------------

    async def connect(self, port: int, ca_bundle: Path, server_name: str) -> None:
        self.context.load_verify_locations(ca_bundle)
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=self.context, server_hostname=server_name
        )
        self.local_port = self.writer.get_extra_info("sockname")[1]
        self.gateway_port = port
        loop = asyncio.get_running_loop()
        self.udp, _ = await loop.create_datagram_endpoint(
            lambda: _Media(self), local_addr=("127.0.0.1", 0)
        )
        self.rtp_port = self.udp.get_extra_info("sockname")[1]
        self._tasks.append(asyncio.ensure_future(self._read()))

    def sdp(self) -> str:
        key = base64.b64encode(self.ours).decode()
        n = self.opus_type
        return (
            "v=0\r\n"
            f"o=rawpeer 4711 {self.version} IN IP4 127.0.0.1\r\n"
            "s=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {self.rtp_port} RTP/SAVP {n} 0\r\n"
            f"a=rtpmap:{n} opus/48000/2\r\n"
            f"a=fmtp:{n} useinbandfec=1\r\n"
            "a=rtpmap:0 PCMU/8000\r\n"
            f"a=crypto:1 {SUITE} inline:{key}\r\n"
            "a=ptime:20\r\na=sendrecv\r\na=rtcp-mux\r\n"
            f"a=ssrc:{self.ssrc} cname:rawpeer\r\n"
        )

    def _request(self, method: str, share: str, body: str = "") -> bytes:
        uri = f"sips:{share}@127.0.0.1:{self.gateway_port}"
        to = f"<{uri}>" + (f";tag={self.remote_tag}" if self.remote_tag else "")
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/TLS 127.0.0.1:{self.local_port};branch=z9hG4bK{secrets.token_hex(6)}",
            "Max-Forwards: 70",
            f"From: <sip:{self.site}@127.0.0.1>;tag={self.tag}",
            f"To: {to}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} {'ACK' if method == 'ACK' else method}",
            f"Contact: <sip:{self.site}@127.0.0.1:{self.local_port};transport=tls>",
        ]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()

    async def invite(self, share: str, timeout: float = 10.0) -> tuple[int, str]:
        """An INVITE (or, in the dialog, a re-INVITE with our SDP again); its final
        answer (status, body), ACKed when it is a 2xx."""
        if self.remote_tag:
            self.cseq += 1
            self.version += 1
        self.writer.write(self._request("INVITE", share, self.sdp()))
        while True:
            status, message = await asyncio.wait_for(self.responses.get(), timeout)
            if status >= 200:
                break
        body = message.partition("\r\n\r\n")[2]
        if status < 300:
            to = re.search(r"^To:.*;tag=([^;\s]+)", message, re.M | re.I)
            self.remote_tag = self.remote_tag or (to.group(1) if to else "")
            self.writer.write(self._request("ACK", share))
            self._answered(body)
        return status, body

    def _answered(self, body: str) -> None:
        crypto = re.search(rf"^a=crypto:\d+ {SUITE} inline:(\S+)", body, re.M)
        media = re.search(r"^m=audio (\d+) ", body, re.M)
        address = re.search(r"^c=IN IP4 (\S+)", body, re.M)
        if crypto and self.rx is None:
            key = base64.b64decode(crypto.group(1).split("|")[0])
            self.rx = Session(Policy(key, ssrc_type=Policy.SSRC_ANY_INBOUND))
        if media and address:
            self.media_to = (address.group(1), int(media.group(1)))

    async def _read(self) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await self.reader.readuntil(b"\r\n\r\n")).decode("utf-8", "replace")
                length = re.search(r"^Content-Length:\s*(\d+)", head, re.M | re.I)
                size = int(length.group(1)) if length else 0
                body = (await self.reader.readexactly(size)).decode() if size else ""
                first = head.split("\r\n", 1)[0]
                if first.startswith("SIP/2.0 "):
                    await self.responses.put((int(first.split()[1]), head + body))
                    continue
                method = first.split()[0]
                self.requests.append(method)
                if method != "ACK":
                    self.writer.write(_ok(head))

    # --- media ------------------------------------------------------------------------

    def start_media(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._send()))

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        k = 0
        while True:
            k += 1
            await asyncio.sleep(max(0.0, start + k * 0.02 - loop.time()))
            if self.media_to is None:
                continue
            t = (self.sent * PACKET + np.arange(PACKET)) / CLOCK
            tone = (0.1 * np.sin(2 * np.pi * self.hz * t)).astype(np.float32)
            payload = self.encoder.encode_float(tone.tobytes(), PACKET)
            marker = 0x80 if self.sent == 0 else 0
            header = _HEADER.pack(0x80, marker | self.opus_type, self.seq, self.ts, self.ssrc)
            self.seq = (self.seq + 1) & 0xFFFF
            self.ts = (self.ts + PACKET) & 0xFFFFFFFF
            self.sent += 1
            self.udp.sendto(self.tx.protect(header + payload), self.media_to)

    def heard(self, since: float) -> tuple[set[int], np.ndarray]:
        """The payload types of the RTP received since ``since`` (loop time), and its Opus
        decoded at 16 kHz."""
        decoder = opuslib_next.Decoder(DECODE_RATE, 1)
        kinds, frames = set(), []
        for at, kind, payload in self.received:
            if at < since:
                continue
            kinds.add(kind)
            if kind == self.opus_type:
                pcm = decoder.decode_float(payload, DECODE_RATE // 50)
                frames.append(np.frombuffer(pcm, np.float32))
        return kinds, np.concatenate(frames) if frames else np.zeros(0, np.float32)

    def _datagram(self, data: bytes) -> None:
        if self.rx is None or len(data) < 12 or 192 <= data[1] <= 223:  # (RTCP: not kept)
            return
        try:
            plain = self.rx.unprotect(data)
        except Exception:  # noqa: BLE001 - not the gateway's (or a replay): not kept
            return
        start = 12 + 4 * (plain[0] & 0x0F)
        if plain[0] & 0x10:  # a header extension
            start += 4 + 4 * int.from_bytes(plain[start + 2 : start + 4], "big")
        now = asyncio.get_running_loop().time()
        self.received.append((now, plain[1] & 0x7F, plain[start:]))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self.udp.close()
        self.writer.close()


def _ok(request: str) -> bytes:
    """200 OK to a request from the gateway (its Via, From, To, Call-ID and CSeq)."""
    keep = [
        line
        for line in request.split("\r\n")[1:]
        if line.split(":", 1)[0].strip().lower() in ("via", "from", "to", "call-id", "cseq")
    ]
    return ("\r\n".join(["SIP/2.0 200 OK", *keep, "Content-Length: 0"]) + "\r\n\r\n").encode()


class _Media(asyncio.DatagramProtocol):
    def __init__(self, peer: RawLinkPeer) -> None:
        self.peer = peer

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.peer._datagram(data)  # noqa: SLF001
