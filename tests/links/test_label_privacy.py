"""Who talks is not readable on the wire: talker labels cross in the link dialog (TLS),
never in the RTP, whose header extensions SRTP authenticates but does not encrypt.

Two real gateways on loopback, the link's media through a UDP relay that keeps a copy of
every datagram (an observer on the path between the two countries); the far side must
still name the real talker (console, audit, metrics). A label INFO is believed only from
the link's verified peer, checked, and capped per second.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

from relay import UdpRelay
from test_link_talker import LABEL, leg, metric, records
from trunk_sites import (
    LinkSpec,
    Pki,
    SiteSpec,
    both_up,
    make_pki,
    media_through,
    radio,
    running,
    share_state,
    site_toml,
)

from gateway.links import labels
from gateway.links.talker import Talker, read
from tests.sip.sip_peers import run
from tests.waiting import until

HEARD = -40.0
US_LABEL = "USCG · Cutter 41"
SECRETS = [s.encode() for s in (LABEL, "Marine 7", "RCMP", US_LABEL, "Cutter 41", "USCG")]


def sites(tmp: Path) -> tuple[Path, Path, Pki]:
    """CA (RCMP · Marine 7, 1000 Hz) and US (USCG · Cutter 41, 1500 Hz) sharing
    ``shiprider`` (as in test_link_talker), and their PKI."""
    pki = make_pki(tmp, ("ca", "us"))
    ca = SiteSpec(
        "ca",
        {"marine": 1000.0},
        [LinkSpec("us", "us", {"marine": "shiprider"})],
        agency="RCMP",
        labels={"marine": "Marine 7"},
    )
    us = SiteSpec(
        "us",
        {"harbor": 1500.0},
        [LinkSpec("ca", "ca", {"harbor": "shiprider"})],
        agency="USCG",
        labels={"harbor": "Cutter 41"},
    )
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    return site_toml(tmp, ca, ports, pki), site_toml(tmp, us, ports, pki), pki


class Observer(UdpRelay):
    """The impairment relay, keeping every datagram it forwards either way."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.seen: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen.append(data)
        super().datagram_received(data, addr)

    def _to_client(self, data: bytes | None, addr: tuple[str, int]) -> None:
        if data is not None:
            self.seen.append(data)
        super()._to_client(data, addr)


def keyed_packets(packets: list[bytes]) -> list[Talker]:
    """The talker words an observer reads in the clear on these (SRTP) packets."""
    said = [read(p[:-10]) for p in packets]  # (the SRTP auth tag after the payload)
    return [t for t in said if isinstance(t, Talker) and t.keyed]


def test_labels_never_cross_in_the_rtp_yet_the_far_side_names_the_talker(
    tmp_path: Path,
) -> None:
    ca_path, us_path, _ = sites(tmp_path)
    us_audit = tmp_path / "us-audit.jsonl"

    async def main() -> None:
        async with (
            Observer(("127.0.0.1", 9)) as wire,
            running(ca_path) as ca,
            running(us_path) as us,
        ):
            await both_up(ca, us)
            await media_through(leg(ca), leg(us), wire)
            wire.seen.clear()
            # CA talks for over a second (the old block repeated the label on the first
            # three packets of an over and every 50th after), then US answers.
            radio(ca, "marine").speaking = True
            await until(
                lambda: radio(us, "harbor").level(1000.0, 0.3) > HEARD, 5, "CA heard in the US"
            )
            await until(lambda: leg(us).talker == LABEL, 5, "the CA label at US")
            assert metric(us, "link_peer_talking", link="ca", share="shiprider") == 1.0
            await until(lambda: len(keyed_packets(wire.seen)) > 60, 10, "60 keyed packets")
            radio(ca, "marine").speaking = False

            def talks() -> list[dict]:
                return [r for r in records(us_audit, "talk") if r["port"] == leg(us).name]

            await until(talks, 5, "the talk record")
            await until(lambda: records(us_audit, "link_talker"), 5, "the over audited")
            radio(us, "harbor").speaking = True
            await until(lambda: leg(ca).talker == US_LABEL, 5, "the US label at CA")
            await until(lambda: radio(ca, "marine").level(1500.0, 0.3) > HEARD, 5, "US heard in CA")
            radio(us, "harbor").speaking = False

            # What the observer saw: the talker words in the clear, never a name.
            assert len({(t.talker_id, t.keyed_at) for t in keyed_packets(wire.seen)}) >= 2
            for secret in SECRETS:
                leaked = [p for p in wire.seen if secret in p]
                assert not leaked, f"{secret!r} in {len(leaked)} RTP packets on the wire"
            # ... and the far side still names the real talker.
            overs = records(us_audit, "link_talker")  # (one, or two if a stall split it)
            assert overs and all(r["label"] == LABEL and r["link"] == "ca" for r in overs)
            assert all(r["talker"] == LABEL for r in talks())
            assert us.links.trunks["ca"].talker_rejected.total() == 0
            assert ca.links.trunks["us"].labels_unanswered == 0

    run(main())


async def info_over_tls(port: int, context: ssl.SSLContext, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="us.link.test"
    )
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return head.split(b"\r\n", 1)[0]
    finally:
        writer.close()


def test_a_label_is_believed_only_from_the_peer_checked_and_capped(tmp_path: Path) -> None:
    ca_path, us_path, pki = sites(tmp_path)
    mallory = pki.cas["ca"].issue("mallory.link.test")  # the peer's agency CA, another name

    async def main() -> None:
        async with running(ca_path) as ca, running(us_path) as us:
            await both_up(ca, us)
            radio(ca, "marine").speaking = True
            await until(lambda: leg(us).talker == LABEL, 5, "the CA label at US")
            heard = leg(us).onair.heard
            dialog = us.links.trunks["ca"].names["shiprider"].dialog
            rejected = us.links.trunks["ca"].talker_rejected

            def forged(cseq: int, transport: str, port: int) -> bytes:
                """An INFO naming CA's current over "Imposter", in the dialog (its Call-ID
                and tags, as if they had leaked), from someone else."""
                text = labels.body(labels.Named(heard.talker_id, heard.keyed_at, "Imposter"))
                return (
                    f"INFO sip:us@127.0.0.1:{port} SIP/2.0\r\n"
                    f"Via: SIP/2.0/{transport} 127.0.0.1:9;branch=z9hG4bKforged{cseq}\r\n"
                    f"From: {dialog.remote_uri};tag={dialog.remote_tag}\r\n"
                    f"To: {dialog.local_uri};tag={dialog.local_tag}\r\n"
                    f"Call-ID: {dialog.call_id}\r\nCSeq: {1000 + cseq} INFO\r\n"
                    f"Content-Type: {labels.CONTENT_TYPE}\r\n"
                    f"Content-Length: {len(text.encode())}\r\n\r\n{text}"
                ).encode()

            # 1. Over TLS with a certificate the CA site's agency issued to another name.
            tls_port = us.sip.transport.port_for("tls")
            context = ssl.create_default_context(cafile=str(pki.cas["us"].bundle))
            context.load_cert_chain(mallory.certificate, mallory.key)
            status = await info_over_tls(tls_port, context, forged(1, "TLS", tls_port))
            assert status == b"SIP/2.0 403 Forbidden"
            # 2. Over plain UDP.
            loop = asyncio.get_running_loop()
            answers: asyncio.Queue[bytes] = asyncio.Queue()
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Answers(answers), local_addr=("127.0.0.1", 0)
            )
            udp_port = us.sip.transport.port
            udp.sendto(forged(2, "UDP", udp_port), ("127.0.0.1", udp_port))
            answer = await asyncio.wait_for(answers.get(), 5)
            assert answer.split(b"\r\n", 1)[0] == b"SIP/2.0 403 Forbidden"
            # (without the dialog's Call-ID and tags it is no dialog at all)
            guess = forged(3, "UDP", udp_port).replace(dialog.call_id.encode(), b"guess@x")
            udp.sendto(guess, ("127.0.0.1", udp_port))
            answer = await asyncio.wait_for(answers.get(), 5)
            udp.close()
            assert answer.split(b"\r\n", 1)[0] == b"SIP/2.0 481 Call/Transaction Does Not Exist"
            assert rejected["stranger"] == 2 and leg(us).talker == LABEL

            # 3. The peer itself, over the link's TLS: bad labels refused and counted; a
            # label for an over it never keys changes nothing; a flood is capped.
            calls = ca.links.trunks["us"].calls
            theirs = ca.links.trunks["us"].names["shiprider"].dialog

            async def say(body: str) -> int:
                answer = await calls.info(theirs, labels.CONTENT_TYPE, body, 20.0)
                assert answer is not None
                return int(answer.status)

            over = f"talker-id={heard.talker_id}\r\nkey-up={heard.keyed_at}\r\n"
            assert await say(over + "label=Mar\x1b[2Jine 7\r\n") == 400
            assert await say(over + f"label={'R' * 65}\r\n") == 400
            assert await say("talker-id=7\r\n") == 400
            assert await say("talker-id=200\r\nkey-up=5\r\nlabel=Ghost\r\n") == 200
            assert rejected["label_text"] == rejected["label_too_long"] == 1
            assert rejected["info"] == 1 and leg(us).talker == LABEL
            # (a slow budget, so that the bound holds however slow this machine is today)
            us.links.trunks["ca"]._label_budget = labels.Budget(rate=1.0, burst=10)  # noqa: SLF001
            started = time.monotonic()
            statuses = await asyncio.gather(
                *(say(f"talker-id={200 + i % 50}\r\nkey-up=5\r\nlabel=x\r\n") for i in range(300))
            )
            accepted = statuses.count(200)
            assert accepted <= 10 + 1.0 * (time.monotonic() - started) + 1, accepted
            assert set(statuses) <= {200, 503} and rejected["flood"] == statuses.count(503) > 0
            assert metric(us, "link_talker_rejected_total", link="ca", reason="flood") > 0
            assert leg(us).talker == LABEL and share_state(us, "ca", "shiprider") == "up"
            assert radio(us, "harbor").level(1000.0, 0.3) > HEARD, "the audio went on"

    run(main())


class _Answers:
    def __init__(self, queue: asyncio.Queue[bytes]) -> None:
        self.queue = queue

    def connection_made(self, transport) -> None:  # noqa: ANN001
        pass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass
