"""Every alert rule, exercised on a running gateway: the test causes the condition, sees
the series the rule reads change on /metrics, and promtool evaluates the shipped rule on
the scraped values (alert_eval.firing): it fires for the port, account or link at fault
and for nothing else, and it is silent on the scrape taken before.

The rules' own unit tests (borderlink.rules_test.yml) use synthetic series; these
prove the gateway exports what the rules read. A test here that the rule file no
longer matches is the one that fails.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import aiohttp
import numpy as np
from alert_eval import RULES, Scrape, firing, scrape
from live_site import free_tcp_port, live_site, require_binary, stop_process
from test_monitoring_files import alert_exprs
from test_port_down import site as port_down_site

from tests.conftest import write_wav
from tests.waiting import until

ROOT = Path(__file__).resolve().parents[2]


def fired(alert: str, before: Scrape, after: Scrape, folder: Path) -> list[dict[str, str]]:
    """The alerts ``after`` raises; ``before`` (and the state before the cause) raises none."""
    assert firing(alert, before, before, folder) == [], f"{alert} fired before the cause"
    alerts = firing(alert, before, after, folder)
    assert alerts, f"{alert} did not fire on the scraped values"
    return alerts


RADIOS = """
[site]
name = "Alerts test"
country = "CA"

[web]
port = 0

# A dead carrier: a source that is always on, far below anything audible.
[ports.hum]
kind = "tone"
tone_hz = 50
level_dbfs = -80

[ports.dead]
kind = "simulated_radio"
talk_offset = "1h"
tot = "2s"
ptt_hang_time = "200ms"

[ports.beacon]
kind = "tone"
tone_hz = 700
level_dbfs = -20

[ports.loud]
kind = "simulated_radio"
talk_offset = "1h"

[talkgroups.land]
members = ["hum"]

[talkgroups.marine]
members = ["dead"]

[talkgroups.coast]
members = ["beacon", "loud"]

[patches.carrier]
talkgroups = ["land", "marine"]
enabled = false
"""


def test_a_stuck_transmitter_a_dead_carrier_and_late_ticks_alert(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with live_site(tmp_path, RADIOS) as gw:
            # loud is keyed by a -20 dBFS beacon: audio, and well within its 3 min TOT.
            await until(lambda: gw.ports["loud"].keyed, 10, "the beacon to key loud")
            before = await scrape(gw)
            assert before.get("borderlink_port_ptt_keyed", port="dead") == 0
            gw.engine.set_patch("carrier", True)  # the hum now keys dead, for good
            after: Scrape | None = None

            async def keyed_past_tot() -> bool:
                nonlocal after
                after = await scrape(gw)
                return after.get("borderlink_port_ptt_keyed_seconds", port="dead") > 2.5

            await until(keyed_past_tot, 10, "dead to stay keyed past its 2 s TOT")
            assert after.get("borderlink_port_ptt_keyed", port="dead") == 1
            assert after.get("borderlink_port_tot_seconds", port="dead") == 2
            assert after.get("borderlink_port_transmit_level_dbfs", port="dead") < -60
            assert after.get("borderlink_port_transmit_level_dbfs", port="loud") > -30
            for alert in ("BorderlinkTransmitterStuck", "BorderlinkKeyedWithoutAudio"):
                alerts = fired(alert, before, after, tmp_path)
                assert [a["port"] for a in alerts] == ["dead"], (alert, alerts)

            # A host starved of CPU: the loop is held 50 ms at a time, so ticks start late.
            quiet = await scrape(gw)
            for _ in range(20):
                time.sleep(0.05)  # noqa: ASYNC251  (the point: block the media clock's loop)
                await asyncio.sleep(0.1)
            starved = await scrape(gw)
            late = "borderlink_engine_late_ticks_total"
            assert starved.get(late) - quiet.get(late) >= 5, (quiet.get(late), starved.get(late))
            # Not asked to stay silent before: the machine is shared, ticks may run late.
            assert firing("BorderlinkLateTicks", quiet, starved, tmp_path)

    asyncio.run(scenario())


def test_a_port_that_cannot_start_and_a_refused_reload_alert(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with live_site(tmp_path, port_down_site(tmp_path)) as gw:
            down = await scrape(gw)
            assert down.get("borderlink_port_up", port="announce") == 0
            assert firing("BorderlinkPortDown", down, down, tmp_path) == [
                {
                    "alertname": "BorderlinkPortDown",
                    "severity": "warning",
                    "port": "announce",
                    "kind": "file",
                    "talkgroup": "notices",
                }
            ]
            tone = 0.25 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
            write_wav(tmp_path / "new.wav", tone.astype(np.float32), 16000)
            (tmp_path / "new.wav").rename(tmp_path / "announce.wav")
            await until(lambda: not gw.down, 20, "the retry to bring the port up")
            up = await scrape(gw)
            assert up.get("borderlink_port_up", port="announce") == 1
            assert firing("BorderlinkPortDown", up, up, tmp_path) == []

            path = gw.config.source
            good = path.read_text()
            path.write_text(good.replace('kind = "tone"', 'kind = "tone"\ntone_hz = "loud"'))
            result = await gw.reload_live(by="SIGHUP")
            assert not result.ok
            refused = await scrape(gw)
            assert refused.get("borderlink_reload_failures_total") == 1
            assert fired("BorderlinkReloadRefused", up, refused, tmp_path) == [
                {"alertname": "BorderlinkReloadRefused", "severity": "warning"}
            ]

    asyncio.run(scenario())


def test_a_gateway_prometheus_cannot_scrape_alerts(tmp_path: Path) -> None:
    """A real Prometheus with the shipped rules: the gateway stops, ``up`` goes to 0 and the
    rule goes pending there (its ``for`` is a minute); promtool says it then fires."""
    prometheus = require_binary("prometheus")
    listen = free_tcp_port()
    api = f"http://127.0.0.1:{listen}/api/v1"

    async def get(path: str, **query: str) -> dict:
        url = f"{api}/{path}?{urllib.parse.urlencode(query)}"
        try:
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                return await r.json()
        except aiohttp.ClientError:
            return {}

    async def up() -> Scrape | None:
        result = (await get("query", query='up{job="borderlink"}')).get("data", {})
        series = result.get("result", [])
        if not series:
            return None
        values = {("up", frozenset(s["metric"].items())): float(s["value"][1]) for s in series}
        return Scrape(time.monotonic(), values)

    async def scenario() -> None:
        proc = None
        try:
            async with live_site(tmp_path, RADIOS) as gw:
                config = tmp_path / "prometheus.yml"
                config.write_text(
                    "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
                    f"  evaluation_interval: 1s\nrule_files: ['{RULES}']\n"
                    "scrape_configs:\n  - job_name: borderlink\n    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{gw.web.port}']\n"
                )
                proc = subprocess.Popen(
                    [
                        prometheus,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{listen}",
                        "--log.level=warn",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=(tmp_path / "prometheus.log").open("w"),
                )
                before: list[Scrape] = []

                async def scraped() -> bool:
                    assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                    got = await up()
                    before[:] = [got] if got and got.get("up") == 1 else []
                    return bool(before)

                await until(scraped, 60, "Prometheus to scrape the running gateway")
            after: list[Scrape] = []

            async def down() -> bool:
                got = await up()
                after[:] = [got] if got and got.get("up") == 0 else []
                return bool(after)

            await until(down, 60, "Prometheus to see the stopped gateway down")

            async def pending() -> bool:
                alerts = (await get("alerts")).get("data", {}).get("alerts", [])
                return any(a["labels"]["alertname"] == "BorderlinkGatewayDown" for a in alerts)

            await until(pending, 60, "the rule to go pending in Prometheus")
            alerts = fired("BorderlinkGatewayDown", before[0], after[0], tmp_path)
            assert [a["job"] for a in alerts] == ["borderlink"], alerts
        finally:
            if proc is not None:
                stop_process(proc)

    asyncio.run(scenario())


def test_a_lost_mqtt_broker_alerts(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "mqtt"))
    from mqtt_support import Broker

    broker = Broker(tmp_path)
    broker.start()
    toml = RADIOS + f'\n[mqtt]\nport = {broker.port}\nreconnect_min = "200ms"\n'
    try:

        async def scenario() -> None:
            async with live_site(tmp_path, toml) as gw:
                await until(lambda: gw.mqtt.connected, 10, "the gateway to connect to the broker")
                before = await scrape(gw)
                assert before.get("borderlink_mqtt_connected") == 1
                broker.kill()
                await until(lambda: not gw.mqtt.connected, 10, "the gateway to lose the broker")
                after = await scrape(gw)
                assert after.get("borderlink_mqtt_connected") == 0
                assert fired("BorderlinkMqttDisconnected", before, after, tmp_path) == [
                    {"alertname": "BorderlinkMqttDisconnected", "severity": "warning"}
                ]

        asyncio.run(scenario())
    finally:
        broker.kill()


def test_a_lost_registration_and_lossy_calls_alert(tmp_path: Path) -> None:
    """kamailio goes away under a registered account; a caller loses every other packet."""
    sys.path[:0] = [str(ROOT / "tests" / "sip")]
    from sip_peers import Kamailio
    from test_call_metrics import Call, Uac
    from test_calls import legs, site

    registrar = Kamailio(tmp_path)
    registrar.start()
    try:

        async def scenario() -> None:
            toml = site(tmp_path, registrar.port) + "\n[web]\nport = 0\n"
            async with live_site(tmp_path, toml) as gw:
                registered = "borderlink_sip_registered"

                async def shows_registered() -> bool:
                    return (await scrape(gw)).get(registered, account="marine") == 1

                await until(shows_registered, 30, "the account to register")
                uac = Uac("127.0.0.42")
                call = Call(uac, gw.sip.port)
                await call.dial("6001")
                await until(lambda: len(legs(gw)) == 1, 10, "the call to be up")
                await call.send_rtp(25)  # every packet arrives
                before = await scrape(gw)
                route = {"route": "6001", "talkgroup": "marine"}
                assert before.get("borderlink_sip_route_packets_lost_total", **route) == 0
                for _ in range(50):  # then every other packet is lost on the way
                    call.seq += 1
                    call.ts += 160
                    await call.send_rtp(1)
                lost = "borderlink_sip_route_packets_lost_total"

                async def losses_counted() -> bool:
                    return (await scrape(gw)).get(lost, **route) >= 40

                await until(losses_counted, 20, "the route to count the lost packets")
                lossy = await scrape(gw)
                assert [
                    a["route"] for a in fired("BorderlinkPacketLoss", before, lossy, tmp_path)
                ] == ["6001"]
                call.hang_up()
                uac.close()

                registrar.stop()

                async def shows_lost() -> bool:
                    return (await scrape(gw)).get(registered, account="marine") == 0

                await until(shows_lost, 60, "the account to show unregistered")
                after = await scrape(gw)
                alerts = fired("BorderlinkSipRegistrationLost", before, after, tmp_path)
                assert [a["account"] for a in alerts] == ["marine"], alerts

        asyncio.run(scenario())
    finally:
        registrar.stop()


def test_a_certificate_near_expiry_and_a_link_down_alert(tmp_path: Path) -> None:
    """The SIP certificate is renewed in place by one that expires in 10 days and the
    config reloaded; a link whose peer never answers is down until this side cuts it."""
    sys.path[:0] = [str(ROOT / "tests" / "links")]
    from trunk_sites import LinkSpec, SiteSpec, make_pki, running, share_state, site_toml

    pki = make_pki(tmp_path, ("ca", "us"))
    sip_cert = pki.cas["ca"].issue("sip.ca.test", days=60)
    spec = SiteSpec("ca", {"marine": 1000.0}, [LinkSpec("us", "us", {"marine": "marine"})])
    path = site_toml(tmp_path, spec, {"us": free_tcp_port()}, pki, "\n[web]\nport = 0\n")
    text = path.read_text()
    cert = pki.certs["ca"]
    path.write_text(
        text.replace(
            f'tls_certificate = "{cert.certificate}"', f'tls_certificate = "{sip_cert.certificate}"'
        ).replace(f'tls_key = "{cert.key}"', f'tls_key = "{sip_cert.key}"')
    )

    async def scenario() -> None:
        async with running(path) as gw:
            await until(lambda: bool(getattr(gw, "web", None) and gw.web.port), 10, "the web")
            await until(lambda: share_state(gw, "us", "marine") == "down", 10, "the link down")
            before = await scrape(gw)
            days = "borderlink_sip_tls_certificate_expiry_days"
            assert 59 < before.get(days) < 61
            assert before.get("borderlink_link_state", link="us", state="down") == 1
            assert firing("BorderlinkLinkDown", before, before, tmp_path) == [
                {
                    "alertname": "BorderlinkLinkDown",
                    "severity": "critical",
                    "link": "us",
                    "state": "down",
                }
            ]
            assert firing("BorderlinkSipCertificateExpiring", before, before, tmp_path) == []

            pki.cas["ca"].issue("sip.ca.test", days=10)  # renewed in place, badly
            result = await gw.reload_live(by="SIGHUP")
            assert result.ok, result.error
            gw.links.cut("us", None, "local:test", "exercise", "cli")
            await until(lambda: share_state(gw, "us", "marine") == "cut", 10, "the cut")
            after = await scrape(gw)
            assert 9 < after.get(days) < 11
            assert after.get("borderlink_link_state", link="us", state="down") == 0
            assert after.get("borderlink_link_state", link="us", state="cut") == 1
            assert firing("BorderlinkLinkDown", after, after, tmp_path) == []  # a cut is chosen
            assert fired("BorderlinkSipCertificateExpiring", before, after, tmp_path) == [
                {"alertname": "BorderlinkSipCertificateExpiring", "severity": "warning"}
            ]

    asyncio.run(scenario())


def test_a_slow_jittery_unstable_link_and_one_cut_by_the_peer_alert(tmp_path: Path) -> None:
    """CA and US reach each other through the impairment relay (tests/links/relay.py):
    200 ms each way on the signalling makes the keepalive's round trip slow; ±150 ms on
    the media, jitter; a blackout drops the dialog (keepalive); then US cuts the link."""
    sys.path[:0] = [str(ROOT / "tests" / "links")]
    from relay import Impairment, TcpRelay, UdpRelay
    from trunk_sites import (
        LinkSpec,
        SiteSpec,
        link_leg,
        make_pki,
        media_through,
        running,
        share_state,
        site_toml,
    )

    pki = make_pki(tmp_path, ("ca", "us"))
    ca = SiteSpec("ca", {"marine": 1000.0}, [LinkSpec("us", "us", {"marine": "ship"})])
    us = SiteSpec("us", {"harbor": 1500.0}, [LinkSpec("ca", "ca", {"harbor": "ship"})])
    web = "\n[web]\nport = 0\n"

    async def scenario() -> None:
        async with (
            TcpRelay(("127.0.0.1", us.tls_port)) as to_us,
            TcpRelay(("127.0.0.1", ca.tls_port)) as to_ca,
            UdpRelay(("127.0.0.1", 9)) as media,
        ):
            ca_path = site_toml(tmp_path, ca, {"us": to_us.port}, pki, web)
            us_path = site_toml(tmp_path, us, {"ca": to_ca.port}, pki)
            async with running(ca_path) as ca_gw, running(us_path) as us_gw:

                def up() -> bool:
                    return (
                        share_state(ca_gw, "us", "ship") == "up"
                        and share_state(us_gw, "ca", "ship") == "up"
                        and link_leg(ca_gw) is not None
                        and link_leg(us_gw) is not None
                    )

                await until(lambda: bool(ca_gw.web and ca_gw.web.port) and up(), 30, "the link up")
                await until(lambda: ca_gw.links.trunks["us"].rtt() is not None, 10, "a round trip")
                before = await scrape(ca_gw)
                ca_gw.ports["marine-radio"].speaking = True
                us_gw.ports["harbor-radio"].speaking = True
                await media_through(link_leg(ca_gw), link_leg(us_gw), media)
                media.impair = Impairment(jitter=0.15)
                for relay in (to_us, to_ca):
                    relay.impair = Impairment(delay=0.2)

                def jitter() -> float:  # CA's, whose /metrics the rules are evaluated on
                    return link_leg(ca_gw).stats().get("jitter_seconds", 0.0)

                await until(
                    lambda: (
                        up() and jitter() > 0.06 and (ca_gw.links.trunks["us"].rtt() or 0) > 0.35
                    ),
                    60,
                    "a slow, jittery link",
                )
                after = await scrape(ca_gw)
                assert fired("BorderlinkLinkSlow", before, after, tmp_path) == [
                    {"alertname": "BorderlinkLinkSlow", "severity": "warning", "link": "us"}
                ]
                routes = [
                    a["route"] for a in fired("BorderlinkLinkJitter", before, after, tmp_path)
                ]
                assert routes == ["link-us-ship"], routes

                for relay in (to_us, to_ca, media):
                    relay.impair = Impairment()
                # On a loaded machine the slow link's keepalive may already have dropped the
                # dialog (while the alerts above were read): a link that is redialling has
                # no keepalive for the blackout to time out.
                await until(up, 60, "the link up before the blackout")
                before = await scrape(ca_gw)
                timeouts = ca_gw.links.trunks["us"].keepalive_timeouts
                for relay in (to_us, to_ca, media):
                    relay.blackout()
                await until(
                    lambda: ca_gw.links.trunks["us"].keepalive_timeouts > timeouts,
                    30,
                    "the keepalive to drop the dark link",
                )
                for relay in (to_us, to_ca, media):
                    relay.resume()
                await until(up, 60, "the link back")
                after = await scrape(ca_gw)
                assert fired("BorderlinkLinkUnstable", before, after, tmp_path) == [
                    {"alertname": "BorderlinkLinkUnstable", "severity": "warning", "link": "us"}
                ]

                before = after
                us_gw.links.cut("ca", None, "local:test", "exercise", "cli")
                await until(
                    lambda: share_state(ca_gw, "us", "ship") == "cut_by_peer",
                    30,
                    "CA to see the cut",
                )
                after = await scrape(ca_gw)
                assert fired("BorderlinkLinkCutByPeer", before, after, tmp_path) == [
                    {
                        "alertname": "BorderlinkLinkCutByPeer",
                        "severity": "warning",
                        "link": "us",
                        "state": "cut_by_peer",
                    }
                ]
                assert firing("BorderlinkLinkDown", after, after, tmp_path) == []

    asyncio.run(scenario())


def test_every_alert_rule_has_a_live_test_here() -> None:
    """A rule added to the rules file needs a test above that causes it."""
    rules = {name for name, _ in alert_exprs()}
    source = Path(__file__).read_text()
    assert len(rules) >= 11
    missing = sorted(r for r in rules if f'"{r}"' not in source.split("def test_every")[0])
    assert not missing, f"no live test causes {missing}"
