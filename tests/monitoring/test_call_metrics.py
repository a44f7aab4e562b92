"""No series per call: SIP calls are counted per route, and their media counters survive them.

Real calls: a raw UDP caller (the SIP suite's ``Uac``) INVITEs, ACKs, sends PCMU RTP
and hangs up with BYE, against a running gateway whose /metrics is scraped over HTTP.
Each call is a port on the engine (``sip-6001#N``); before this change each one added
its own series to every per-port family, labelled with that name.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import struct
import subprocess
import sys
from pathlib import Path

from live_site import http_get, live_site, require_binary
from prometheus_client.parser import text_string_to_metric_families

from tests.waiting import until

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "sip"), str(ROOT)]  # as under `python -m pytest`

from test_auth import Uac, header, status  # noqa: E402  (the SIP suite's raw caller)
from test_calls import legs, site  # noqa: E402

CALLER = "zelda-secret-caller"
ROUTE = {"route": "6001", "talkgroup": "marine"}


class Call:
    """One raw call: INVITE → 200 → ACK, RTP sent by hand, BYE."""

    def __init__(self, uac: Uac, gateway_port: int) -> None:
        self.uac, self.gateway_port = uac, gateway_port
        self.seq, self.ts, self.ssrc = 0, 0, secrets.randbits(32)

    async def dial(self, number: str) -> None:
        self.call_id, invite = self.uac.invite(self.gateway_port, number, caller=CALLER)
        self.ok = await self.uac.final(self.call_id)
        assert status(self.ok) == 200, self.ok
        self.from_ = re.search(r"^From: (.+?)\r$", invite, re.M).group(1)
        self.media = int(re.search(r"^m=audio (\d+)", self.ok, re.M).group(1))
        self._request("ACK", 1)

    def _request(self, method: str, cseq: int) -> None:
        uac = self.uac
        target = re.search(r"<([^>]+)>", header(self.ok, "Contact")).group(1)
        text = (
            f"{method} {target} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {uac.host}:{uac.port};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
            f"From: {self.from_}\r\nTo: {header(self.ok, 'To')}\r\n"
            f"Call-ID: {self.call_id}\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        uac.sock.sendto(text.encode(), ("127.0.0.1", self.gateway_port))

    async def send_rtp(self, packets: int) -> None:
        """PCMU silence, paced at 20 ms (the pace a phone sends at, not a wait for sync)."""
        for _ in range(packets):
            head = struct.pack("!BBHII", 0x80, 0, self.seq & 0xFFFF, self.ts, self.ssrc)
            self.uac.rtp_for(self.call_id).sendto(head + b"\xff" * 160, ("127.0.0.1", self.media))
            self.seq, self.ts = self.seq + 1, self.ts + 160
            await asyncio.sleep(0.02)

    def hang_up(self) -> None:
        self._request("BYE", 2)


def samples(text: str, name: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def value(text: str, name: str, **labels: str) -> float | None:
    found = [s.value for s in samples(text, name) if s.labels == labels]
    return found[0] if found else None


def test_calls_are_counted_per_route_with_no_series_of_their_own(tmp_path: Path) -> None:
    toml = site(tmp_path, None) + "\n[web]\nport = 0\n"
    promtool = require_binary("promtool")

    async def scenario() -> None:
        async with live_site(tmp_path, toml) as gw:
            uac = Uac("127.0.0.41")
            calls = [Call(uac, gw.sip.port) for _ in range(3)]
            for call in calls:
                await call.dial("6001")
            await until(lambda: len(legs(gw)) == 3, 10, "three calls up")
            seen: list[float] = []  # the route's packets_in, scrape after scrape

            async def scrape() -> str:
                text = (await http_get(gw, "/metrics"))[1]
                packets = value(text, "borderlink_sip_route_packets_in_total", **ROUTE)
                assert packets is not None, "no packets_in series for the route"
                assert not seen or packets >= seen[-1], f"went back: {seen} then {packets}"
                seen.append(packets)
                return text

            text = (await http_get(gw, "/metrics"))[1]
            # Nothing names a call or its caller: no label value with '#', no caller name.
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    for label, v in sample.labels.items():
                        assert "#" not in v and CALLER not in v and not v.startswith("sip-6001"), (
                            f"{sample.name}{{{label}={v!r}}} is a per-call label"
                        )
            assert CALLER not in text
            text = await scrape()
            assert value(text, "borderlink_sip_route_calls", **ROUTE) == 3
            assert value(text, "borderlink_sip_route_calls", route="7001", talkgroup="quiet") == 0
            check = subprocess.run(
                [promtool, "check", "metrics"],
                input=text,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), (
                check.stdout + check.stderr
            )

            # Two calls send 25 packets each; the route counts 50, and keeps them after
            # both calls end.
            await asyncio.gather(calls[0].send_rtp(25), calls[1].send_rtp(25))

            async def packets_counted() -> bool:
                nonlocal text
                text = await scrape()
                return seen[-1] == 50

            await until(packets_counted, 10, "the route to count both calls' 50 packets")
            # Gauges are the worst call's, and only for routes with calls up.
            jitter = "borderlink_sip_route_jitter_seconds_max"
            assert value(text, jitter, **ROUTE) is not None
            assert value(text, jitter, route="7001", talkgroup="quiet") is None
            calls[0].hang_up()
            await until(lambda: len(legs(gw)) == 2, 10, "the first call to end")
            text = await scrape()
            assert seen[-1] == 50
            assert value(text, "borderlink_sip_route_calls", **ROUTE) == 2
            calls[1].hang_up()
            await until(lambda: len(legs(gw)) == 1, 10, "the second call to end")
            text = await scrape()
            assert seen[-1] == 50, seen
            assert value(text, "borderlink_sip_route_calls", **ROUTE) == 1
            out = value(text, "borderlink_sip_route_packets_out_total", **ROUTE)
            assert out is not None and out > 0  # the gateway sent the calls the talkgroup
            calls[2].hang_up()
            await until(lambda: not legs(gw), 10, "the last call to end")
            text = await scrape()
            assert value(text, "borderlink_sip_route_calls", **ROUTE) == 0
            assert seen[-1] == 50 and seen == sorted(seen)
            uac.close()

    asyncio.run(scenario())
