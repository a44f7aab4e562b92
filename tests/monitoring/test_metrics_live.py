"""/metrics, /healthz, /readyz on a running gateway: checked by promtool and a real Prometheus."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.parse
from pathlib import Path

import aiohttp
import numpy as np
from gateway.monitoring.metrics import SiteMetrics
from live_site import free_tcp_port, http_get, live_site, require_binary, stop_process
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.waiting import until

SITE = """
[site]
name = "Monitoring test"
country = "CA"

[web]
port = 0

[ports.boat]
kind = "simulated_radio"
tone_hz = 1000
level_dbfs = -12
talk_every = "3s"
talk_for = "1s"
talk_offset = "500ms"
ptt_hang_time = "200ms"

[ports.shore]
kind = "simulated_radio"
talk_offset = "1h"
ptt_hang_time = "200ms"

[ports.beacon]
kind = "tone"
tone_hz = 700
level_dbfs = -20

[talkgroups.marine]
members = ["boat", "shore"]

[talkgroups.land]
members = ["beacon"]
floor = "single"

[patches.pursuit]
talkgroups = ["marine", "land"]
enabled = false
"""


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Parse exposition text into {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    found = [v for (n, lab), v in samples(text).items() if n == name and wanted <= lab]
    assert len(found) == 1, f"{name}{labels}: expected one sample, got {found}"
    return found[0]


def test_live_metrics_pass_promtool_and_follow_a_keying_radio(tmp_path: Path) -> None:
    promtool = require_binary("promtool")

    async def scenario() -> tuple[str, list[str]]:
        async with live_site(tmp_path, SITE) as gw:
            status, first = await http_get(gw, "/metrics")
            assert status == 200
            assert value(first, "borderlink_port_up", port="boat", kind="simulated_radio") == 1
            # The beacon talks all the time at -20 dBFS: its receive level says so.
            assert abs(value(first, "borderlink_port_receive_level_dbfs", port="beacon") + 20) < 0.5

            # The boat keys up at 0.5 s: the shore radio is keyed and carries the boat's tone.
            async def shore_keyed() -> bool:
                text = (await http_get(gw, "/metrics"))[1]
                return value(text, "borderlink_port_ptt_keyed", port="shore") == 1

            await until(shore_keyed, 10, "the shore radio to be keyed by the boat's over")
            during = (await http_get(gw, "/metrics"))[1]
            assert value(during, "borderlink_port_talking", port="boat") == 1
            assert value(during, "borderlink_port_squelch_open", port="boat") == 1
            assert value(during, "borderlink_talkgroup_talkers", talkgroup="marine") == 1
            assert abs(value(during, "borderlink_port_receive_level_dbfs", port="boat") + 12) < 0.5
            assert abs(value(during, "borderlink_port_transmit_level_dbfs", port="shore") + 12) < 1

            # After the 1 s over and the 200 ms hang time, the counters hold the durations.
            async def over_done() -> bool:
                text = (await http_get(gw, "/metrics"))[1]
                return value(text, "borderlink_port_transmit_seconds_total", port="shore") > 0 and (
                    value(text, "borderlink_port_ptt_keyed", port="shore") == 0
                )

            await until(over_done, 10, "the over to end and the shore transmitter to drop")
            after = (await http_get(gw, "/metrics"))[1]
            talk = value(after, "borderlink_port_talk_seconds_total", port="boat")
            sent = value(after, "borderlink_port_transmit_seconds_total", port="shore")
            assert abs(talk - 1.0) < 0.05, talk
            assert abs(sent - 1.2) < 0.05, sent  # the over plus 200 ms hang time
            assert value(after, "borderlink_events_total", kind="ptt_on") >= 1
            ticks = value(after, "borderlink_engine_ticks_total")
            observed = value(after, "borderlink_engine_tick_duration_seconds_count")
            assert observed >= ticks - 1 and observed > 50  # every tick lands in the histogram
            return after, []

    text, _ = asyncio.run(scenario())
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == "", check.stdout + check.stderr


def test_health_and_readiness_name_the_broken_port(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with live_site(tmp_path, SITE) as gw:
            status, body = await http_get(gw, "/healthz")
            assert status == 200 and json.loads(body)["alive"] is True
            status, body = await http_get(gw, "/readyz")
            assert status == 200, body
            assert json.loads(body)["ports"]["shore"] == {"kind": "simulated_radio", "up": True}

            def broken() -> np.ndarray:  # a sound card that hands over garbage
                return np.full(gw.engine.frame_samples, np.nan, np.float32)

            gw.ports["shore"].read = broken  # type: ignore[method-assign]
            await until(
                lambda: gw.engine.health["shore"].faults > 0, 10, "the engine to isolate shore"
            )
            status, body = await http_get(gw, "/readyz")
            report = json.loads(body)
            assert status == 503 and report["ready"] is False
            assert report["ports"]["shore"]["up"] is False
            assert "NaN" in report["ports"]["shore"]["reason"]
            assert report["ports"]["boat"]["up"] is True
            metrics = (await http_get(gw, "/metrics"))[1]
            assert value(metrics, "borderlink_port_up", port="shore") == 0
            assert value(metrics, "borderlink_port_bad_frames_total", port="shore") >= 1
            assert value(metrics, "borderlink_ports", kind="simulated_radio", state="down") == 1

    asyncio.run(scenario())


def test_a_real_prometheus_scrapes_the_gateway(tmp_path: Path) -> None:
    prometheus = require_binary("prometheus")

    async def scenario() -> None:
        async with live_site(tmp_path, SITE) as gw:
            listen = free_tcp_port()
            config = tmp_path / "prometheus.yml"
            config.write_text(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
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
            try:
                query = 'borderlink_port_receive_level_dbfs{port="beacon",job="borderlink"}'
                url = f"http://127.0.0.1:{listen}/api/v1/query?" + urllib.parse.urlencode(
                    {"query": query}
                )
                result: list = []

                async def answered() -> bool:
                    assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                    try:
                        async with aiohttp.ClientSession() as s, s.get(url) as r:
                            body = await r.json()
                    except aiohttp.ClientError:
                        return False
                    result[:] = body.get("data", {}).get("result", [])
                    return bool(result)

                await until(answered, 30, "Prometheus to scrape the gateway and answer")
                # What Prometheus stored is the beacon's real level: a -20 dBFS tone.
                assert abs(float(result[0]["value"][1]) + 20) < 0.5, result
                assert result[0]["metric"]["talkgroup"] == "land"
            finally:
                stop_process(proc)

    asyncio.run(scenario())


def test_fast_text_matches_prometheus_client_rendering(tmp_path: Path) -> None:
    """The exporter's own writer and prometheus_client's, fed one snapshot, say the same."""

    async def scenario() -> None:
        async with live_site(
            tmp_path,
            SITE.replace('name = "Monitoring test"', 'name = "Quote \\" and \\\\ test"'),
        ) as gw:
            metrics = SiteMetrics.of(gw)
            await until(lambda: gw.engine.keying.keyed.any(), 10, "a keyed port")
            snap = metrics.snapshot()
            ours = metrics.render(snap).decode()
            registry = CollectorRegistry(auto_describe=False)
            registry.register(metrics.collector(snap))
            theirs = generate_latest(registry).decode()
            assert samples(ours) == samples(theirs)
            assert len(samples(ours)) > 60
            assert value(ours, "borderlink_site_info") == 1
            assert ("site", 'Quote " and \\ test') in next(
                lab for (n, lab) in samples(ours) if n == "borderlink_site_info"
            )

    asyncio.run(scenario())
