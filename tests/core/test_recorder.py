"""Recordings are never lost: a new file per start, hour or over; headers right; retention."""

from __future__ import annotations

import asyncio
import json
import os
import time
import wave
from pathlib import Path

import numpy as np
from helpers import tone_level

from gateway.app import Gateway
from gateway.config import load_config, parse_config
from tests.waiting import until

SITE = """
[site]
name = "Recorder test"
country = "CA"

[ports.beacon]
kind = "tone"
tone_hz = 800
{schedule}

[ports.log]
kind = "recorder"
directory = "{directory}"
{extra}

[talkgroups.marine]
members = ["beacon", "log"]
"""


def gateway(tmp_path: Path, schedule: str = "", extra: str = "") -> Gateway:
    path = tmp_path / "site.toml"
    path.write_text(SITE.format(directory=tmp_path / "rec", schedule=schedule, extra=extra))
    return Gateway(load_config(path))


def audio(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        return data, w.getframerate()


def run(gw: Gateway, seconds: float) -> None:
    for _ in range(round(seconds / gw.engine.frame_seconds)):
        gw.engine.tick()


def test_a_restart_starts_a_new_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    first = gateway(tmp_path)
    run(first, 2.0)
    first.shutdown()
    (old,) = (tmp_path / "rec").glob("*.wav")
    assert old.name.startswith("marine-") and old.name.endswith("Z.wav")
    second = gateway(tmp_path)  # the same second of UTC time: the name must not clash
    run(second, 1.0)
    second.shutdown()
    files = sorted((tmp_path / "rec").glob("*.wav"))
    assert len(files) == 2 and old in files
    kept, rate = audio(old)
    assert len(kept) == 2 * rate  # the first run's two seconds, untouched
    assert tone_level(kept, 800) > -20
    newer = next(f for f in files if f != old)
    assert len(audio(newer)[0]) == rate


def test_a_reload_that_changes_the_recorder_keeps_its_recording(tmp_path: Path) -> None:
    gw = gateway(tmp_path)
    run(gw, 1.0)
    source = gw.config.source
    assert source is not None
    source.write_text(source.read_text().replace("[talkgroups", "continuous = false\n[talkgroups"))
    assert gw.reload().changed == ["log"]
    run(gw, 1.0)
    gw.shutdown()
    lengths = sorted(len(audio(f)[0]) for f in (tmp_path / "rec").glob("*.wav"))
    assert lengths == [16000, 16000]


def test_the_header_is_right_even_if_the_gateway_is_killed(tmp_path: Path) -> None:
    gw = gateway(tmp_path)
    run(gw, 1.0)  # no shutdown: the file is read as a killed process would leave it
    (path,) = (tmp_path / "rec").glob("*.wav")
    assert len(audio(path)[0]) == 16000
    gw.shutdown()


def test_a_new_file_every_utc_hour(tmp_path: Path) -> None:
    gw = gateway(tmp_path)
    recorder = gw.ports["log"]
    start = 3600.0 * 500_000 - 0.49  # half a second before the top of a UTC hour
    engine = gw.engine
    recorder.now = lambda: start + engine.tick_count * engine.frame_seconds  # type: ignore
    run(gw, 1.0)
    gw.shutdown()
    names = sorted(f.name for f in (tmp_path / "rec").glob("*.wav"))
    assert names == ["marine-20270115T075959Z.wav", "marine-20270115T080000Z.wav"]
    assert [len(audio(tmp_path / "rec" / n)[0]) for n in names] == [8000, 8000]


def test_a_file_per_over_holds_the_over_and_its_short_pauses(tmp_path: Path) -> None:
    schedule = 'talk_every = "4s"\ntalk_for = "1s"\ntalk_offset = "500ms"'
    gw = gateway(tmp_path, schedule, 'split = "over"\nover_gap = "2s"')
    run(gw, 10.0)  # overs at 0.5, 4.5 and 8.5 s
    gw.shutdown()
    files = sorted((tmp_path / "rec").glob("*.wav"))
    assert len(files) == 3
    for path in files:
        data, rate = audio(path)
        assert abs(len(data) - rate) <= 320 and tone_level(data, 800) > -20


def test_old_recordings_are_deleted_and_every_file_is_audited(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    rec = tmp_path / "rec"
    rec.mkdir()
    stale, other = rec / "marine-20200101T000000Z.wav", rec / "notes.wav"
    for path in (stale, other):
        path.write_bytes(b"old")
        os.utime(path, (time.time() - 40 * 86400,) * 2)
    path = tmp_path / "site.toml"
    text = SITE.format(directory=rec, schedule="", extra="keep_days = 30")
    path.write_text(text + f'\n[audit]\npath = "{audit}"\n')

    async def scenario() -> None:
        gw = Gateway(load_config(path))
        task = asyncio.create_task(gw.run())
        await until(lambda: not stale.exists() and gw.clock.ticks > 10, 10, "the stale file to go")
        await until(lambda: "recording_deleted" in audit.read_text(), 10, "the deletion audited")
        gw.stop()
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert other.exists()  # not this talkgroup's recording: never touched
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = [r["event"] for r in records]
    assert "recording_start" in kinds and "recording_stop" in kinds
    start = next(r for r in records if r["event"] == "recording_start")
    stop = next(r for r in records if r["event"] == "recording_stop")
    assert start["port"] == "log" and start["talkgroup"] == "marine"
    assert stop["file"] == start["file"] and stop["duration_seconds"] > 0
    deleted = next(r for r in records if r["event"] == "recording_deleted")
    assert deleted["file"] == str(stale)


def test_the_old_path_key_is_explained() -> None:
    text = SITE.format(directory="x", schedule="", extra="").replace(
        'directory = "x"', 'path = "x.wav"'
    )
    try:
        parse_config(text, "site.toml")
    except Exception as exc:
        assert "directory" in str(exc) and "ports.log" in str(exc)
    else:
        raise AssertionError("a recorder with path = ... was accepted")
