"""A port that cannot start is down with its reason, retried, and the rest of the site runs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from live_site import Probe, dominant_hz, free_tcp_port, http_get, live_site, rms_dbfs
from test_metrics_live import value

from tests.conftest import write_wav
from tests.waiting import until


def site(tmp_path: Path) -> str:
    return f"""
[site]
name = "Port down test"
country = "CA"

[web]
host = "127.0.0.1"
port = {free_tcp_port()}

[audit]
path = "{tmp_path / "audit.jsonl"}"
sync_every = "100ms"

[ports.announce]
kind = "file"
path = "{tmp_path / "announce.wav"}"

[ports.beacon]
kind = "tone"
tone_hz = 700

[talkgroups.notices]
members = ["announce"]

[talkgroups.marine]
members = ["beacon"]
"""


def test_a_missing_wav_is_down_with_its_reason_and_comes_back(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"

    async def scenario() -> None:
        async with live_site(tmp_path, site(tmp_path)) as gw:
            marine, notices = Probe("marine_ear", gw.engine.timing), Probe("ear", gw.engine.timing)
            gw.engine.attach(marine, "marine")
            gw.engine.attach(notices, "notices")
            # The rest of the site runs: the beacon is heard in its talkgroup.
            await until(lambda: len(marine.heard) > 25, 10, "the beacon's talkgroup to carry audio")
            assert dominant_hz(marine.recent(25), 16000) == 700
            status, body = await http_get(gw, "/readyz")
            report = json.loads(body)
            assert status == 503 and report["ready"] is False
            assert report["ports"]["announce"]["up"] is False
            assert "announce.wav: no such file" in report["ports"]["announce"]["reason"]
            assert report["ports"]["beacon"]["up"] is True
            metrics = (await http_get(gw, "/metrics"))[1]
            assert value(metrics, "borderlink_port_up", port="announce") == 0
            assert value(metrics, "borderlink_ports", kind="file", state="down") == 1
            await until(lambda: "port_down" in audit.read_text(), 10, "the audit record")

            tone = 0.25 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
            write_wav(tmp_path / "new.wav", tone.astype(np.float32), 16000)
            (tmp_path / "new.wav").rename(tmp_path / "announce.wav")  # appears whole
            await until(lambda: not gw.down, 20, "the retry to bring the port up")
            await until(lambda: rms_dbfs(notices.recent(25)) > -20, 10, "the announcement to play")
            assert dominant_hz(notices.recent(25), 16000) == 440
            status, _ = await http_get(gw, "/readyz")
            assert status == 200

    asyncio.run(scenario())
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    down = next(r for r in records if r["event"] == "port_down")
    assert down["port"] == "announce" and "no such file" in down["reason"]
    assert any(r["event"] == "port_up" and r["port"] == "announce" for r in records)


def test_a_live_reload_that_cannot_start_a_port_is_refused_counted_and_audited(
    tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.jsonl"
    text = site(tmp_path).replace('members = ["announce"]', 'members = ["beacon2"]')
    text = text.replace("[ports.announce]", '[ports.beacon2]\nkind = "tone"\n\n[ports.unused]')
    text = text.replace(
        '[ports.unused]\nkind = "file"', '[ports.unused]\nkind = "file"\nenabled = false'
    )

    async def scenario() -> None:
        async with live_site(tmp_path, text) as gw:
            path = gw.config.source
            assert path is not None and not gw.down
            path.write_text(text.replace("enabled = false\n", ""))  # the WAV is still missing
            result = await gw.reload_live(by="SIGHUP")
            assert not result.ok and "port unused cannot start" in result.error
            assert "unused" not in gw.ports and (await http_get(gw, "/readyz"))[0] == 200
            metrics = (await http_get(gw, "/metrics"))[1]
            assert value(metrics, "borderlink_reload_failures_total") == 1
            path.write_text(text.replace("tone_hz = 700", "tone_hz = 900"))
            result = await gw.reload_live(by="--watch")
            assert result.ok and result.changed == ["beacon"]

    asyncio.run(scenario())
    reloads = [r for r in map(json.loads, audit.read_text().splitlines()) if r["event"] == "reload"]
    assert [(r["by"], r["ok"]) for r in reloads] == [("SIGHUP", False), ("--watch", True)]
    assert "announce.wav: no such file" in reloads[0]["error"]
    assert reloads[1]["changes"] == "ports ~beacon"
