"""The audit log on a running gateway: every over, PTT, patch and run-time port, durable."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from live_site import Probe, live_site
from test_audit_docs import check_records

from gateway.audit import AuditConfig, AuditFile
from gateway.config import ConfigError, parse_config
from tests.waiting import until


def site(audit_path: Path, extra: str = "") -> str:
    return f"""
[site]
name = "Audit test"
country = "US"

[audit]
path = "{audit_path}"
sync_every = "100ms"

[ports.boat]
kind = "simulated_radio"
agency = "USCG"
talk_every = "10s"
talk_for = "800ms"
talk_offset = "300ms"
ptt_hang_time = "200ms"

[ports.shore]
kind = "simulated_radio"
agency = "RCMP"
talk_offset = "1h"
ptt_hang_time = "200ms"

[ports.beacon]
kind = "tone"

[talkgroups.marine]
members = ["boat", "shore"]

[talkgroups.land]
members = ["beacon"]

[patches.pursuit]
talkgroups = ["marine", "land"]
enabled = false
{extra}
"""


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_over_a_patch_and_a_call_are_audited_as_they_happen(tmp_path: Path) -> None:
    audit = tmp_path / "audit" / "audit.jsonl"

    async def scenario() -> None:
        async with live_site(tmp_path, site(audit)) as gw:
            # Written the moment it happens, not at shutdown: read while the gateway runs.
            def has(event: str) -> bool:
                return audit.exists() and any(r["event"] == event for r in lines(audit))

            await until(lambda: has("transmit"), 10, "the shore transmitter's record")
            gw.engine.set_patch("pursuit", True)
            probe = Probe("console-7", gw.config.timing)
            gw.engine.attach(probe, "land")
            await until(
                lambda: any(r["event"] == "joined" for r in lines(audit)), 10, "the join record"
            )
            gw.engine.detach(probe)
            await until(lambda: has("left"), 10, "the leave record")
            gw.audit.record("console_login", operator="dispatcher1", address="127.0.0.1")
            running = lines(audit)
        done = lines(audit)
        assert done[: len(running)] == running  # append-only
        first, last = done[0], done[-1]
        assert first["event"] == "audit_start" and last["event"] == "audit_stop"
        assert first["recording"] == {"marine": "off", "land": "off"}
        assert [r["seq"] for r in done] == list(range(1, len(done) + 1))
        assert all(r["site"] == "Audit test" and r["ts"].endswith("Z") for r in done)
        by_event: dict[str, dict] = {}
        for record in done:
            by_event.setdefault(record["event"], record)  # the first of each kind
        talk = next(r for r in done if r["event"] == "talk" and r["port"] == "boat")
        assert (talk["port"], talk["agency"], talk["talkgroup"]) == ("boat", "USCG", "marine")
        assert talk["duration_seconds"] == pytest.approx(0.8, abs=0.021)
        transmit = next(r for r in done if r["event"] == "transmit" and r["port"] == "shore")
        assert (transmit["port"], transmit["agency"]) == ("shore", "RCMP")
        assert transmit["duration_seconds"] == pytest.approx(1.0, abs=0.021)  # over + hang time
        assert transmit["start"] < transmit["ts"]
        started = {(r["event"], r["port"]) for r in done if r["event"] in ("talk_start", "ptt_on")}
        assert {("talk_start", "boat"), ("ptt_on", "shore")} <= started
        assert by_event["patch"] == by_event["patch"] | {
            "patch": "pursuit",
            "state": "on",
            "talkgroups": ["marine", "land"],
        }
        assert by_event["joined"] | {"seq": 0, "ts": ""} == {
            "seq": 0,
            "ts": "",
            "site": "Audit test",
            "event": "joined",
            "port": "console-7",
            "kind": "probe",
            "talkgroup": "land",
        }
        assert by_event["left"]["duration_seconds"] >= 0
        assert by_event["console_login"]["operator"] == "dispatcher1"
        assert gw.audit.stats() == {"audit_records": len(done), "audit_write_errors": 0}
        check_records(done)  # as docs/audit.md lists them

    asyncio.run(scenario())


def test_recording_is_reported_only_where_configured(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    extra = f"""
[ports.marine_log]
kind = "recorder"
directory = "{tmp_path / "recordings"}"
"""
    text = site(audit, extra).replace(
        'members = ["boat", "shore"]', 'members = ["boat", "shore", "marine_log"]'
    )

    async def scenario() -> None:
        async with live_site(tmp_path, text):
            pass

    asyncio.run(scenario())
    assert lines(audit)[0]["recording"] == {"marine": "on: marine_log", "land": "off"}


def test_rotation_by_size_keeps_every_line_across_files(tmp_path: Path) -> None:
    config = AuditConfig(path=tmp_path / "a.jsonl", max_size_kb=1, keep=3, rotate_daily=False)
    clock = [1_800_000_000.0]
    audit = AuditFile(config, now=lambda: clock[0])
    audit.open()
    for i in range(60):
        clock[0] += 1.0
        audit.write({"seq": i, "event": "ptt_on", "port": "boat", "pad": "x" * 40})
    audit.close()
    rotated = audit.rotated()
    assert len(rotated) == 3  # older ones pruned
    kept = [
        json.loads(line)["seq"]
        for p in [*rotated, config.path]
        for line in p.read_text().splitlines()
    ]
    assert kept == list(range(kept[0], 60))  # contiguous, newest last, nothing lost in between
    assert all(p.stat().st_size <= 1024 for p in [*rotated, config.path])


def test_rotation_at_utc_midnight(tmp_path: Path) -> None:
    config = AuditConfig(path=tmp_path / "a.jsonl")
    clock = [1_800_000_000.0 - 1_800_000_000.0 % 86400 + 86400 - 2]  # 2 s before midnight UTC
    audit = AuditFile(config, now=lambda: clock[0])
    audit.open()
    audit.write({"event": "before"})
    clock[0] += 4
    audit.write({"event": "after"})
    audit.close()
    (old,) = audit.rotated()
    assert [json.loads(x)["event"] for x in old.read_text().splitlines()] == ["before"]
    assert [json.loads(x)["event"] for x in config.path.read_text().splitlines()] == ["after"]


def test_unwritable_audit_is_counted_not_fatal(tmp_path: Path) -> None:
    config = AuditConfig(path=tmp_path / "a.jsonl")
    audit = AuditFile(config)
    audit.write({"event": "lost"})  # never opened
    assert audit.write_errors == 1 and audit.records == 0


def test_bad_audit_section_is_explained() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('[site]\nname="x"\ncountry="US"\n[audit]\npath="/tmp/a"\nmax_size="1MB"\n')
    message = str(err.value)
    assert "audit.max_size" in message and "max_size_kb" in message
