"""A talker label that comes after the over was first named by the peer's site ID.

The label of an over crosses in the link dialog (an INFO over TLS), its audio in the
RTP: on a WAN the RTP can win, and the far side's talk_start then names only the
peer's site ID. When the label comes, a ``talker_named`` event for the same over
names the real talker in the audit log and on MQTT, and the console's who-is-talking
shows it. The signalling is made slow honestly: each side reaches the other's SIP over
TLS through a TCP relay that delays what CA sends; the RTP goes straight.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from relay import Impairment, TcpRelay
from trunk_sites import (
    LinkSpec,
    SiteSpec,
    both_up,
    link_leg,
    make_pki,
    radio,
    running,
    site_toml,
)

from gateway.webrtc.passwords import hash_password
from tests.mqtt.mqtt_support import Broker, Subscriber
from tests.sip.sip_peers import run
from tests.waiting import until

LABEL = "RCMP · Marine 7"
PASSWORD = "dispatch-secret-7"
SIGNALLING_DELAY = 0.4  # seconds, CA's SIP to US: the label INFO comes this long after the RTP


def records(path: Path, event: str) -> list[dict]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("event") == event]


def test_a_late_label_renames_the_over_in_audit_mqtt_and_console(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    pki = make_pki(tmp_path, ("ca", "us"))
    ca = SiteSpec(
        "ca",
        {"marine": 1000.0},
        [LinkSpec("us", "us", {"marine": "shiprider"})],
        agency="RCMP",
        labels={"marine": "Marine 7"},
    )
    us = SiteSpec(
        "us", {"harbor": 1500.0}, [LinkSpec("ca", "ca", {"harbor": "shiprider"})], agency="USCG"
    )
    us_extra = f"""
[mqtt]
port = {broker.port}
site_id = "us"
reconnect_min = "200ms"

[web]
host = "127.0.0.1"
port = 0

[console]
ice_addresses = ["127.0.0.1"]

[console.operators.dispatch]
password_hash = "{hash_password(PASSWORD)}"
agency = "USCG"
talk = ["*"]
"""
    us_audit = tmp_path / "us-audit.jsonl"

    async def main() -> None:
        jar = aiohttp.CookieJar(unsafe=True)
        slow, fast = Impairment(delay=SIGNALLING_DELAY), Impairment()
        async with (
            TcpRelay(("127.0.0.1", us.tls_port), slow, back=fast) as to_us,
            TcpRelay(("127.0.0.1", ca.tls_port), fast, back=slow) as to_ca,
        ):
            # Each side reaches the other's SIP through a relay, and whichever dialog is
            # kept, what CA says in it is slow (a round trip stays well under the keepalive's
            # 1.2 s).
            ca_path = site_toml(tmp_path, ca, {"us": to_us.port}, pki)
            us_path = site_toml(tmp_path, us, {"ca": to_ca.port}, pki, us_extra)
            async with (
                running(ca_path) as ca_gw,
                running(us_path) as us_gw,
                Subscriber(broker.port, "borderlink/us/event/#") as events,
                aiohttp.ClientSession(cookie_jar=jar) as http,
            ):
                await both_up(ca_gw, us_gw)
                assert to_us.accepted + to_ca.accepted > 0, "the signalling goes via the relays"
                await until(lambda: us_gw.mqtt.connected, 10, "the US gateway on the broker")
                base = f"http://127.0.0.1:{us_gw.web.port}"
                me = {"operator": "dispatch", "password": PASSWORD}
                assert (await http.post(f"{base}/api/console/login", json=me)).status == 200

                radio(ca_gw, "marine").speaking = True
                port = link_leg(us_gw).name
                await until(lambda: records(us_audit, "talk_start"), 5, "the over heard at US")
                (start,) = records(us_audit, "talk_start")
                # The RTP beat the label by the relay's delay: the over was named "ca" first.
                assert start["port"] == port and start["talker"] == "ca"
                await until(lambda: records(us_audit, "talker_named"), 5, "the late label")
                (named,) = records(us_audit, "talker_named")
                assert named["port"] == port and named["talker"] == LABEL
                await until(lambda: events.on("/event/talker_named"), 5, "MQTT talker_named")
                (message,) = events.on("/event/talker_named")
                assert message["port"] == port and message["talker"] == LABEL
                assert message["talkgroup"] == "harbor"
                assert [e["talker"] for e in events.on("/event/talk_start")] == ["ca"]

                async def who_talks() -> list[str]:
                    state = await (await http.get(f"{base}/api/console/state")).json()
                    return [t["who"] for tile in state["talkgroups"] for t in tile["talkers"]]

                assert await who_talks() == [LABEL], "the US console's who-is-talking"
                radio(ca_gw, "marine").speaking = False
                await until(lambda: records(us_audit, "talk"), 5, "the talk record")
                (talk,) = records(us_audit, "talk")
                assert talk["talker"] == LABEL
                assert len(records(us_audit, "talker_named")) == 1, "one correction per over"

    try:
        run(main())
    finally:
        broker.stop()
