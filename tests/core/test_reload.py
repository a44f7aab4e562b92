"""Live reload applies the difference between ticks and refuses bad configs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.audit import AuditConfig, AuditLog
from gateway.config import load_config
from gateway.engine import Event

SITE = """
[site]
name = "Reload test"
country = "US"

[ports.a]
kind = "tone"
tone_hz = 500

[ports.radio]
kind = "simulated_radio"
ptt_hang_time = "1s"
talk_offset = "1h"

[ports.c]
kind = "simulated_radio"
talk_offset = "1h"

[talkgroups.tg]
members = ["a", "radio", "c"]
"""


@pytest.fixture
def site(tmp_path: Path) -> tuple[Gateway, Path]:
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    return Gateway(load_config(path)), path


def test_reload_keeps_unchanged_ports_and_their_ptt(site: tuple[Gateway, Path]) -> None:
    gw, path = site
    for _ in range(5):
        gw.engine.tick()
    radio = gw.ports["radio"]
    assert radio.keyed  # a's tone keys it
    old_c = gw.ports["c"]
    path.write_text(
        SITE.replace(
            'talk_offset = "1h"\n\n[talkgroups',
            'talk_offset = "1h"\ntx_gain_db = -3\n\n[talkgroups',
        )
        + '\n[ports.d]\nkind = "simulated_radio"\n'
    )
    result = gw.reload()
    assert result.ok and result.changed == ["c"] and result.added == ["d"] and not result.removed
    assert gw.ports["radio"] is radio and radio.keyed  # untouched, still keyed
    assert gw.ports["c"] is not old_c
    gw.engine.tick()
    assert radio.keyed


def test_removed_port_is_unkeyed_and_closed(site: tuple[Gateway, Path]) -> None:
    gw, path = site
    for _ in range(5):
        gw.engine.tick()
    radio = gw.ports["radio"]
    assert radio.keyed
    path.write_text(
        SITE.replace('"a", "radio", "c"', '"a", "c"').replace(
            '[ports.radio]\nkind = "simulated_radio"\nptt_hang_time = "1s"\ntalk_offset = "1h"\n',
            "",
        )
    )
    result = gw.reload()
    assert result.ok and result.removed == ["radio"]
    assert not radio.keyed and "radio" not in gw.ports
    assert [p.name for p in gw.engine.ports] == ["a", "c"]


def test_bad_reload_is_refused_and_the_old_config_keeps_running(site: tuple[Gateway, Path]) -> None:
    gw, path = site
    ports_before = dict(gw.ports)
    path.write_text(SITE.replace("ptt_hang_time", "hangtime"))
    result = gw.reload()
    assert not result.ok and "unknown key" in result.error and "site.toml:" in result.error
    assert gw.ports == ports_before
    path.write_text(SITE.replace("[timing]", "") + '\n[timing]\nframe = "10ms"\n')
    result = gw.reload()
    assert not result.ok and "restart" in result.error
    for _ in range(3):
        gw.engine.tick()
    assert gw.ports["radio"].keyed


def test_reload_summary_names_what_changed_in_every_section(site: tuple[Gateway, Path]) -> None:
    """Not "0 changed" when a talkgroup or a console operator changed; names, never values."""
    from gateway.webrtc.passwords import hash_password  # registers [console] too

    gw, path = site
    hashes = [hash_password(p) for p in ("first-secret", "second-secret", "bob-secret")]
    console = '\n[console.operators.alice]\npassword_hash = "{}"\n'
    path.write_text(SITE + console.format(hashes[0]))
    assert gw.reload().summary == "console: added"
    bob = f'\n[console.operators.bob]\npassword_hash = "{hashes[2]}"\n'
    path.write_text(
        SITE.replace('"a", "radio", "c"', '"a", "radio"') + console.format(hashes[1]) + bob
    )
    result = gw.reload()
    assert result.ok and result.removed == []
    assert result.changes == ["talkgroups ~tg", "console: operators +bob ~alice"]
    assert result.summary == "talkgroups ~tg; console: operators +bob ~alice"
    assert not any(h in result.summary for h in hashes)


def test_a_reload_whose_port_cannot_start_is_refused_whole_and_audited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = tmp_path / "audit.jsonl"
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    gw = Gateway(load_config(path))
    gw.audit = AuditLog(gw, AuditConfig(path=audit))
    gw.audit.file.open()
    ports_before = dict(gw.ports)
    path.write_text(
        SITE.replace('"a", "radio", "c"', '"a", "radio", "c", "news"').replace(
            'ptt_hang_time = "1s"', 'ptt_hang_time = "1s"\ntot = "0"'
        )
        + f'\n[ports.news]\nkind = "file"\npath = "{tmp_path / "missing.wav"}"\n'
    )
    with caplog.at_level(logging.ERROR, logger="gateway.app"):
        result = gw.reload(by="SIGHUP")
    assert not result.ok and "port news cannot start" in result.error
    assert "missing.wav: no such file" in result.error
    assert any("reload refused" in r.message for r in caplog.records if r.levelname == "ERROR")
    assert gw.ports == ports_before and gw.config.ports["radio"].tot == 180  # old config stays
    assert gw.reload_failures == 1
    (record,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert record["event"] == "reload" and record["ok"] is False and record["by"] == "SIGHUP"
    assert "missing.wav" in record["error"]
    for _ in range(3):
        gw.engine.tick()
    assert gw.ports["radio"].keyed


def test_a_patch_turned_on_by_a_reload_is_an_event(site: tuple[Gateway, Path]) -> None:
    gw, path = site
    seen: list[Event] = []
    gw.engine.listeners.append(seen.append)
    two = SITE.replace('members = ["a", "radio", "c"]', 'members = ["a", "radio"]')
    two += '\n[talkgroups.other]\nmembers = ["c"]\n'
    path.write_text(two + '\n[patches.join]\ntalkgroups = ["tg", "other"]\nenabled = false\n')
    assert gw.reload().ok and not [e for e in seen if e.kind == "patch"]
    path.write_text(two + '\n[patches.join]\ntalkgroups = ["tg", "other"]\nenabled = true\n')
    assert gw.reload().ok
    assert [(e.kind, e.detail) for e in seen if e.kind == "patch"] == [("patch", "join on")]
