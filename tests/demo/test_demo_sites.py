"""The demo's two site files, as the demo writes them, pass `borderlink check`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.demo.pki import make_site_pki
from gateway.demo.scenario import LINES
from gateway.demo.sites import make_sites, parse_metrics
from gateway.demo.voices import make_voices


def test_both_demo_sites_check_with_their_link_console_and_voices(tmp_path: Path) -> None:
    make_site_pki(tmp_path / "certs", "ca", "CA Test CA", "ca.demo.borderlink")
    make_site_pki(tmp_path / "certs", "us", "US Test CA", "us.demo.borderlink")
    make_voices(tmp_path / "voices", LINES)
    ca, us = make_sites(tmp_path, "scrypt$16384$8$1$c2FsdA==$aGFzaA==")
    ports = {
        ca.values["web_port"],
        us.values["web_port"],
        ca.values["tls_port"],
        us.values["tls_port"],
    }
    assert len(ports) == 4, "each site has its own web and TLS port"
    for site, peer in ((ca, "us"), (us, "ca")):
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "check", str(site.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "config OK" in result.stdout
        assert f"{peer}.demo.borderlink" in site.config.read_text()
        for port, _ in LINES.items():
            if port in site.config.read_text():
                assert (tmp_path / "voices" / f"{port}.wav").stat().st_size > 10_000


def test_the_view_reads_a_sites_metrics() -> None:
    text = "\n".join(
        [
            "# TYPE borderlink_engine_ticks_total counter",
            "borderlink_engine_ticks_total 500.0",
            "# TYPE borderlink_port_talking gauge",
            'borderlink_port_talking{port="uscg_cutter",kind="simulated_radio",'
            'talkgroup="marine"} 1.0',
            "# TYPE borderlink_talkgroup_talkers gauge",
            'borderlink_talkgroup_talkers{talkgroup="marine"} 2.0',
            "# TYPE borderlink_link_state gauge",
            'borderlink_link_state{link="ca",state="up"} 0.0',
            'borderlink_link_state{link="ca",state="cut_by_peer"} 1.0',
            "# TYPE borderlink_link_rtt_seconds gauge",
            'borderlink_link_rtt_seconds{link="ca"} 0.004',
            "",
        ]
    )
    status = parse_metrics(text)
    assert status.ticks == 500
    assert status.ports["uscg_cutter"]["talking"] == 1.0
    assert status.link_state == "cut_by_peer"
    assert status.rtt == 0.004 and status.talkers == {"marine": 2}
