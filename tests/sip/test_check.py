"""`borderlink check` refuses [sip] routes and dial-outs naming a talkgroup that does not exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SITE = """
[site]
name = "sip check"
country = "CA"

[ports.radio]
kind = "simulated_radio"

[talkgroups.marine]
members = ["radio"]

[sip]
listen = "127.0.0.1:5999"

[sip.routes."6001"]
talkgroup = "marine"
public = true

[sip.routes."6002"]
talkgroup = "marne"
public = true

[sip.dial_out.duty]
talkgroup = "harbour"
uri = "sip:duty@127.0.0.1:5998"
"""


def test_check_names_each_missing_talkgroup_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "site.toml"
    bad.write_text(SITE)
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "2 problems" in err, err
    lines = SITE.splitlines()
    route_line = lines.index('talkgroup = "marne"') + 1
    dial_line = lines.index('talkgroup = "harbour"') + 1
    assert "sip.routes.6002.talkgroup" in err and "'marne'" in err
    assert "did you mean 'marine'" in err
    assert f":{route_line}" in err and f":{dial_line}" in err
    assert "sip.dial_out.duty.talkgroup" in err and "'harbour'" in err
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(SITE.replace('"marne"', '"marine"').replace('"harbour"', '"marine"'))
    ok = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(fixed)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
