"""``borderlink check`` on console sections: operators may only name real talkgroups."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from console_site import site_toml

BORDERLINK = str(Path(sys.executable).parent / "borderlink")


def cli_site() -> str:
    """The test site with radios a stand-alone ``borderlink`` knows (no test port kinds)."""
    return site_toml().replace('kind = "console_test_radio"', 'kind = "simulated_radio"')


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BORDERLINK, "check", str(path)], capture_output=True, text=True, timeout=60
    )


def test_check_refuses_an_operator_naming_a_missing_talkgroup(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(cli_site())
    ok = check(good)
    assert ok.returncode == 0, ok.stderr
    assert "[console] configured" in ok.stdout

    text = cli_site().replace('monitor = ["marine"]', 'monitor = ["marin", "land"]')
    text = text.replace('talk = ["*"]', 'talk = ["*", "harbour"]')
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    result = check(bad)
    assert result.returncode == 2, result.stdout
    lines = text.splitlines()
    monitor_line = next(i for i, t in enumerate(lines, 1) if t.startswith('monitor = ["marin"'))
    talk_line = next(i for i, t in enumerate(lines, 1) if t.startswith('talk = ["*", "harbour"'))
    err = result.stderr
    assert f"bad.toml:{monitor_line}" in err and "console.operators.bob.monitor" in err, err
    assert "no talkgroup named 'marin'" in err and "did you mean 'marine'" in err, err
    assert f"bad.toml:{talk_line}" in err and "console.operators.alice.talk" in err, err
    assert "no talkgroup named 'harbour'" in err, err
    assert "'land'" not in err.replace("talkgroups: land, marine", "")  # real names pass
    assert "config OK" not in result.stdout
