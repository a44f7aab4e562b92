"""RTCP: what our reports say is checked against what really happened on the wire, both
with a raw endpoint that loses packets on purpose and times its answers (decoded here
with plain struct, not with our parser), and with baresip, which reads our reports and
sends its own."""

from __future__ import annotations

import asyncio
import re
import struct
import time

import numpy as np
import pytest
from sip_peers import run, running_gateway, tone
from test_calls import RATE, legs, site
from test_shared_port import RawPhone

from gateway.sip.rtcp import (
    Report,
    ReportBlock,
    RtcpState,
    build_report,
    middle32,
    ntp_now,
    parse_compound,
)
from tests.waiting import until

NTP_OFFSET = 2208988800


def fast_reports(tmp_path) -> str:
    return site(tmp_path, None).replace("[sip]\n", '[sip]\nrtcp_interval = "1s"\n', 1)


def decode_sr(data: bytes) -> dict:
    """Our compound SR, read field by field (RFC 3550 §6.4.1), independent of gateway code."""
    first, kind, words, ssrc = struct.unpack_from("!BBHI", data)
    assert first >> 6 == 2 and kind == 200, data[:8].hex()
    msw, lsw, rtp_ts, packets, octets = struct.unpack_from("!IIIII", data, 8)
    report = {"ssrc": ssrc, "ntp_mid": ((msw & 0xFFFF) << 16) | (lsw >> 16), "packets": packets}
    if first & 0x1F:
        b_ssrc, lost_word, highest, jitter, lsr, dlsr = struct.unpack_from("!IIIIII", data, 28)
        report.update(
            block_ssrc=b_ssrc,
            fraction=lost_word >> 24,
            lost=lost_word & 0xFFFFFF,
            highest=highest,
            jitter=jitter,
            lsr=lsr,
            dlsr=dlsr,
        )
    sdes = 4 * (words + 1)
    assert data[sdes + 1] == 202 and data[sdes + 8] == 1, "no SDES CNAME after the SR"
    return report


def rfc3550_jitter(packets: list[tuple[float, int]], rate: int = RATE) -> float:
    """Interarrival jitter in timestamp units (RFC 3550 A.8), from (arrival s, RTP ts)."""
    jitter = 0.0
    for (t0, ts0), (t1, ts1) in zip(packets, packets[1:], strict=False):
        d = abs((t1 - t0) * rate - (ts1 - ts0))
        jitter += (d - jitter) / 16
    return jitter


def test_report_round_trip_and_malformed_shapes():
    block = ReportBlock(7, 25, -3, 70000, 42, 0x12345678, 65536)
    packet = build_report(99, "gw@127.0.0.1", (ntp_now(), 160, 10, 1600), block)
    (report,) = parse_compound(packet)
    assert (report.kind, report.ssrc, report.packets, report.octets) == (200, 99, 10, 1600)
    assert report.blocks == (block,)
    assert parse_compound(build_report(5, "x", None, None))[0].kind == 201
    for bad in (
        packet[:6],  # truncated
        packet[:20],  # SR cut inside its sender info
        bytes([0x40]) + packet[1:],  # version 1
        bytes([0x85]) + packet[1:],  # says five report blocks, carries one
        packet[28 + 24 :],  # SDES alone: a compound packet starts with SR or RR
        b"\x80\xc8\xff\xff" + packet[4:],  # length far past the end
    ):
        assert parse_compound(bad) is None, bad[:8].hex()


def test_a_round_trip_just_below_zero_is_zero_and_a_clock_step_is_not_a_measurement():
    """baresip counts DLSR in whole milliseconds: on loopback it may say it held our SR up to
    1 ms longer than it did. That is a round trip of 0, not one to throw away."""
    sent = 1_800_000_000.0  # when our SR left (wall time)

    def rtt_after(held: float, dlsr: float, state: RtcpState | None = None) -> float | None:
        state = state or RtcpState(None)
        block = ReportBlock(42, 0, 0, 0, 0, middle32(ntp_now(sent)), int(dlsr * 65536))
        state.heard(Report(201, 7, None, None, None, None, (block,)), 42, sent + held)
        return state.rtt

    assert rtt_after(0.0302, 0.030) == pytest.approx(0.0002, abs=1 / 65536)
    assert rtt_after(0.0302, 0.031) == 0.0  # libre's ms truncation, not a negative path
    state = RtcpState(None)
    rtt_after(0.100, 0.080, state)
    assert rtt_after(0.100, 2.0, state) == pytest.approx(0.020, abs=1 / 65536)  # step: kept


def test_reports_tell_the_phone_its_loss_and_we_measure_the_round_trip(tmp_path):
    phone = RawPhone("reporter", 700)
    hold = 0.2  # the phone answers our SR this long after it arrived
    seen: list[dict] = []

    def read_reports() -> list[tuple[float, bytes]]:
        got = []
        while True:
            try:
                got.append((time.time(), phone.rtcp.recv(2048)))
            except BlockingIOError:
                return got

    async def scenario() -> None:
        async with running_gateway(fast_reports(tmp_path)) as gw:
            await phone.call(gw.sip.port, "7001")
            leg = (await until(lambda: legs(gw), 5, "the call"))[0]
            first_seq = phone.seq
            loop = asyncio.get_running_loop()
            start = loop.time()
            sent: list[tuple[float, int]] = []  # (send time, RTP timestamp) of delivered packets
            for k in range(150):  # 3 s; every tenth packet lost on the way (15)
                if k % 10 != 5:
                    sent.append((time.monotonic(), phone.ts))
                phone.send_frame(skip=k % 10 == 5)
                phone.drain()
                await asyncio.sleep(max(0.0, start + (k + 1) * 0.02 - loop.time()))
            last_seq = phone.seq - 1
            # Only reports made after the last packet count.
            sent_all = time.time() + 0.05
            reports = await until(
                lambda: (
                    seen.extend(decode_sr(d) | {"at": t} for t, d in read_reports())
                    or [r for r in seen if r["at"] > sent_all]
                ),
                4,
                "a report after the stream",
            )
            ours = reports[-1]
            assert ours["block_ssrc"] == phone.ssrc
            assert ours["lost"] == 15, ours
            assert ours["highest"] == first_seq + 149 == last_seq, ours
            # On loopback arrival is send time, so the RFC 3550 estimate over our own send
            # times is what the gateway must report (a shared machine makes it non-zero).
            expected = rfc3550_jitter(sent)
            assert abs(ours["jitter"] - expected) <= 8 + 0.25 * expected, (ours["jitter"], expected)
            assert ours["packets"] >= 100 and ours["ssrc"] == int(leg.bank.table.tx_ssrc[leg.row])
            assert leg.stats()["packets_lost"] == 15
            # The phone's SR: our next report echoes its time (LSR) and how long we held it.
            phone_ntp = ntp_now()
            phone_sr = build_report(phone.ssrc, "phone", (phone_ntp, 0, 150, 24000), None)
            phone.rtcp.sendto(phone_sr, ("127.0.0.1", leg.bank.port + 1))
            sr_sent = time.time()
            echoed = await until(
                lambda: [
                    decode_sr(d) | {"at": t}
                    for t, d in read_reports()
                    if decode_sr(d).get("lsr") == middle32(phone_ntp)
                ],
                3,
                "our report to echo the phone's SR",
            )
            echo = echoed[0]
            assert -0.01 <= echo["dlsr"] / 65536 <= echo["at"] - sr_sent + 0.01, echo
            # The phone answers that report `hold` seconds late, with DLSR = 0: the round
            # trip we measure is the hold (plus at most a tick before we read it).
            await asyncio.sleep(hold)
            answer = build_report(
                phone.ssrc,
                "phone",
                None,
                ReportBlock(echo["ssrc"], 0, 0, 0, 0, echo["ntp_mid"], 0),
            )
            phone.rtcp.sendto(answer, ("127.0.0.1", leg.bank.port + 1))
            await until(lambda: "rtt_seconds" in leg.stats(), 2, "a round-trip time")
            rtt = leg.stats()["rtt_seconds"]
            waited = time.time() - echo["at"]
            assert hold - 0.01 <= rtt <= waited + 0.01, (rtt, waited)
            assert leg.stats()["rtcp_reports_in"] == 2
            # Junk on the RTCP port is counted, and the call goes on.
            bank = leg.bank
            before = bank.table.malformed["rtcp"]
            phone.rtcp.sendto(b"\x81\xc9\x00\x07" + bytes(8), ("127.0.0.1", bank.port + 1))
            await until(lambda: bank.table.malformed["rtcp"] == before + 1, 2, "junk RTCP counted")
            assert legs(gw)

    try:
        run(scenario())
    finally:
        phone.close()


@pytest.mark.parametrize("mux", [False, True], ids=["rtcp-port", "rtcp-mux"])
def test_baresip_reads_our_reports_and_its_reports_give_us_a_round_trip(phones, tmp_path, mux):
    """Both ways RTCP can travel: on the RTCP port (RTP + 1), or multiplexed on the RTP
    port when the phone offers a=rtcp-mux (RFC 5761)."""
    phone = phones("rtcp", np.concatenate([np.zeros(RATE // 2), tone(600, 25)]), rtcp_mux=mux)
    stats: dict = {}

    async def scenario() -> None:
        async with running_gateway(fast_reports(tmp_path)) as gw:
            phone.start(dial=f"sip:6001@127.0.0.1:{gw.sip.port}", seconds=25)
            leg = (await until(lambda: legs(gw), 5, "the call"))[0]
            assert leg.bank.table.media[leg.row].rtcp.mux is mux
            # baresip reports every ~5 s (randomised); the first one that echoes our SR
            # can take three or four of its intervals on a busy machine (the phone runs 25 s).
            try:
                await until(lambda: "rtt_seconds" in leg.stats(), 22, "baresip echoing our SR")
            except AssertionError as exc:  # rare under a full CI run: say what was seen
                seen = {k: leg.stats()[k] for k in ("rtcp_reports_in", "rtcp_reports_out")}
                said = phone.output()[-800:]
                raise AssertionError(f"{exc}; {seen}; baresip said: {said}") from exc
            await until(lambda: leg.stats()["rtcp_reports_out"] >= 3, 5, "our reports")
            stats.update(leg.stats())
            if mux:  # nothing of this call on the RTCP port: ours went to its RTP port
                assert (
                    leg.bank.table.media[leg.row].rtcp.remote
                    == leg.bank.table.media[leg.row].remote
                )
            # Our BYE: baresip prints its RTCP summary when a call is closed (not on exit).
            await gw.sip.calls.hangup(
                next(d for d in gw.sip.calls.dialogs.values() if d.leg is leg)
            )
            await until(lambda: "EX=BareSip" in phone.output(), 5, "baresip's RTCP summary")

    run(scenario())
    # A loopback round trip is what the two processes' scheduling adds (74 ms seen beside
    # stress-ng): the bound only catches wrong arithmetic (units of 1/65536 s read as
    # seconds, LSR/DLSR mixed up), which is off by orders of magnitude or negative.
    assert 0.0 <= stats["rtt_seconds"] < 0.5, "loopback round trip"
    assert stats["remote_packets_lost"] == 0  # baresip lost nothing of ours on loopback
    # baresip's rtcpsummary line at hang-up: PL=rx,tx;JI=rx,tx — "tx" is what our
    # reports told it about its own stream.
    line = re.search(r"PL=(-?\d+),(-?\d+);PD=[^;]*;JI=([\d.]+),([\d.]+)", phone.output())
    assert line, f"no RTCP summary from baresip: {phone.output()[-1500:]}"
    tx_lost, tx_jitter = int(line.group(2)), float(line.group(4))
    assert tx_lost == stats["packets_lost"] == 0
    # Our jitter figure for its stream, as baresip decoded it (timestamp units).
    ours = stats["jitter_seconds"] * RATE
    assert 0 < tx_jitter < 8 * 20, f"jitter reported to baresip: {tx_jitter}"
    assert abs(tx_jitter - ours) <= max(8.0, ours), (tx_jitter, ours)
