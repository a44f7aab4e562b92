"""Config errors must name the file, key, line and fix — every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config
from gateway.endpoints import ENDPOINTS, Endpoint
from gateway.site import summary

REPO = Path(__file__).resolve().parents[2]

GOOD = """
[site]
name = "Test"
country = "CA"

[ports.a]
kind = "simulated_radio"
ptt_hang_time = "800ms"

[ports.b]
kind = "tone"
tone_hz = 440

[talkgroups.tg]
members = ["a", "b"]
floor = "single"
priority = { a = 5 }
"""


def test_good_config_parses_with_units() -> None:
    config = parse_config(GOOD)
    assert config.ports["a"].ptt_hang_time == pytest.approx(0.8)
    assert config.ports["a"].half_duplex and not config.ports["b"].half_duplex
    assert config.timing.frame_samples == 320
    assert config.talkgroups["tg"].priority == {"a": 5}


@pytest.mark.parametrize("name", ["example-site.toml"])  # config/demo/: tests/demo
def test_shipped_configs_are_valid(name: str) -> None:
    config = load_config(REPO / "config" / name)
    text = summary(config)
    assert "config OK" in text


def problems(text: str, endpoints: tuple = ENDPOINTS) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "site.toml", endpoints)
    return [p.render("site.toml") for p in info.value.problems]


def test_misspelt_key_is_an_error_with_line_and_suggestion() -> None:
    text = GOOD.replace('ptt_hang_time = "800ms"', 'ptt_hangtime = "800ms"')
    (only,) = problems(text)
    assert only.startswith("site.toml:8: ports.a.ptt_hangtime: unknown key")
    assert "did you mean 'ptt_hang_time'" in only


def test_misspelt_key_inside_a_named_table_gets_a_suggestion() -> None:
    """Keys of [sip.routes."NUMBER"] and [console.operators.NAME] tables, not only ports'."""

    text = GOOD + '\n[sip.routes."6001"]\ntalkgroup = "tg"\ntalkgrop = "tg"\n'
    (only,) = problems(text)
    assert only.startswith(f"site.toml:{len(text.splitlines())}: sip.routes.6001.talkgrop:")
    assert "did you mean 'talkgroup'" in only


def test_all_problems_are_reported_at_once() -> None:
    text = (
        GOOD.replace('country = "CA"', 'country = "Canada"')
        .replace('ptt_hang_time = "800ms"', "ptt_hang_time = 2")
        .replace('members = ["a", "b"]', 'members = ["a", "c"]')
        + '\n[patches.p]\ntalkgroups = ["tg", "nope"]\n'
    )
    found = problems(text)
    joined = "\n".join(found)
    assert "site.country" in joined
    assert (
        "ports.a.ptt_hang_time" in joined and "needs a unit" in joined and "'2ms' or '2s'" in joined
    )
    assert "no port named 'c'" in joined
    assert "no talkgroup named 'nope'" in joined
    assert len(found) == 4


def test_unknown_kind_lists_known_kinds() -> None:
    (only,) = problems(GOOD.replace('kind = "tone"', 'kind = "tonee"'))
    assert "unknown port kind 'tonee'" in only and "did you mean 'tone'" in only
    assert "simulated_radio" in only


def test_port_in_two_talkgroups_explains_patches() -> None:
    text = GOOD + '\n[talkgroups.other]\nmembers = ["a"]\n'
    (only,) = problems(text)
    assert "already a member of talkgroup 'tg'" in only and "patch" in only


def test_frame_must_be_10_or_20_ms_and_syntax_errors_have_lines() -> None:
    (only,) = problems(GOOD + '\n[timing]\nframe = "15ms"\n')
    assert "timing.frame" in only and "'10ms' or '20ms'" in only
    (syntax,) = problems(GOOD + "\n[ports.x\n")
    assert syntax.startswith("site.toml:") and "not valid TOML" in syntax


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_sections_name_only_configured_talkgroups() -> None:
    """A section's talkgroup names are checked like patches', with line and suggestion."""
    from gateway.config import Model

    class Routes(Model):
        numbers: dict[str, str] = {}

        def talkgroup_references(self) -> list[tuple[tuple[str, ...], str]]:
            return [(("numbers", number), tg) for number, tg in self.numbers.items()]

    endpoints = (*ENDPOINTS, Endpoint("routes", section="routes", config=Routes))
    good = GOOD + '\n[routes]\nnumbers = { "100" = "tg" }\n'
    assert parse_config(good, endpoints=endpoints).section("routes").numbers == {"100": "tg"}
    (only,) = problems(good.replace('"100" = "tg"', '"100" = "tgg"'), endpoints)
    assert "routes.numbers.100" in only and "no talkgroup named 'tgg'" in only
    line = good.splitlines().index('numbers = { "100" = "tg" }') + 1
    assert "did you mean 'tg'" in only and only.startswith(f"site.toml:{line}:")


@pytest.mark.parametrize("written", ["0", '"0"', '"0s"'])
def test_tot_off_is_written_either_way(written: str) -> None:
    config = parse_config(GOOD.replace('ptt_hang_time = "800ms"', f"tot = {written}"))
    assert config.ports["a"].tot == 0


def test_an_always_on_test_source_has_no_tot_unless_asked() -> None:
    config = parse_config(
        GOOD
        + '\n[ports.sched]\nkind = "tone"\ntalk_every = "10s"\ntalk_for = "1s"\n'
        + '\n[ports.capped]\nkind = "tone"\ntot = "1min"\n'
    )
    assert config.ports["b"].tot == 0  # talks all the time: the TOT would cut it for good
    assert config.ports["sched"].tot == 180 and config.ports["capped"].tot == 60
    assert "b                    tone" in summary(config)
    assert "(talks all the time; no TOT)" in summary(config)


def test_an_always_on_tone_is_still_heard_after_the_default_tot() -> None:
    from gateway.app import Gateway

    text = GOOD.replace('ptt_hang_time = "800ms"', 'talk_offset = "1h"')
    gw = Gateway(parse_config(text))
    radio = gw.ports["a"]
    for _ in range(round(200 / gw.engine.frame_seconds)):  # past the 3-minute default
        gw.engine.tick()
    assert radio.keyed and radio.last_heard is not None
