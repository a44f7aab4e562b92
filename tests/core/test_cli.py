"""The command line as an operator uses it: check, run, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BORDERLINK = [sys.executable, "-m", "gateway.cli"]

SITE = """
[site]
name = "CLI test"
country = "CA"

[ports.source]
kind = "tone"
tone_hz = 700

[ports.radio]
kind = "simulated_radio"
talk_offset = "1h"

[talkgroups.tg]
members = ["source", "radio"]
"""


def borderlink(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BORDERLINK, *args], capture_output=True, text=True, timeout=60)


def test_version_and_help() -> None:
    assert borderlink("--version").stdout.startswith("borderlink ")
    help_text = borderlink("--help").stdout
    for sub in ("run", "check", "demo"):
        assert sub in help_text


def test_check_prints_summary_or_every_error(tmp_path: Path) -> None:
    good = borderlink("check", str(REPO / "config" / "example-site.toml"))
    assert good.returncode == 0 and "config OK" in good.stdout and "shiprider" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(SITE.replace('talk_offset = "1h"', 'talk_ofset = "1h"').replace("700", '"x"'))
    result = borderlink("check", str(bad))
    assert result.returncode == 2
    assert "2 problems" in result.stderr
    assert "ports.radio.talk_ofset: unknown key; did you mean 'talk_offset'?" in result.stderr
    assert "ports.source.tone_hz" in result.stderr


def test_check_names_a_missing_wav_and_a_recorder_directory_it_cannot_make(tmp_path: Path) -> None:
    locked = tmp_path / "a-file"  # a recorder cannot make a directory inside a file
    locked.write_text("")
    site = tmp_path / "site.toml"
    site.write_text(
        SITE.replace('"source", "radio"', '"source", "radio", "news", "log"')
        + f'\n[ports.news]\nkind = "file"\npath = "{tmp_path / "news.wav"}"\n'
        + f'\n[ports.log]\nkind = "recorder"\ndirectory = "{locked / "rec"}"\n'
    )
    result = borderlink("check", str(site))
    assert result.returncode == 2, result.stdout
    assert "2 problems" in result.stderr
    line = site.read_text().splitlines().index(f'path = "{tmp_path / "news.wav"}"') + 1
    assert (
        f"site.toml:{line}: ports.news.path: {tmp_path / 'news.wav'}: no such file" in result.stderr
    )
    assert f"ports.log.directory: {locked} is not a directory" in result.stderr


class Running:
    """``borderlink run`` in a child process, read line by line; killed if a test fails."""

    started: list[subprocess.Popen] = []

    def __init__(self, config: Path, *options: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*BORDERLINK, "run", *options, str(config)], stderr=subprocess.PIPE, text=True, env=env
        )
        Running.started.append(self.proc)
        self.lines: list[str] = []

    def read_until(self, text: str, timeout: float = 90.0) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not seen; got:\n{''.join(self.lines)}")


@pytest.fixture(autouse=True)
def _no_orphans():
    yield
    while Running.started:
        proc = Running.started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("command", [["check"], ["run"], ["levels", "__FILE__", "radio"]])
def test_every_command_reading_a_site_reports_its_errors_the_same_way(
    tmp_path: Path, command: list[str]
) -> None:
    site = tmp_path / "site.toml"
    site.write_text(SITE.replace('country = "CA"', 'country = "Canada"'))
    args = [str(site) if a == "__FILE__" else a for a in command]
    if "__FILE__" not in command:
        args.append(str(site))
    result = borderlink(*args)
    assert result.returncode == 2, result.stderr
    assert f"{site}:4: site.country: use the two-letter ISO 3166 code" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_unkeys_and_exits_cleanly(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(SITE)
    run = Running(config)
    run.read_until("ptt_on radio")
    run.proc.send_signal(signal.SIGTERM)
    line = run.read_until("shutdown:")
    assert "unkeyed radio" in line and "closed 2 ports" in line
    assert run.proc.wait(timeout=10) == 0


def test_sighup_reload_refuses_bad_config_and_keeps_running(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(SITE)
    run = Running(config)
    run.read_until("ptt_on radio")
    config.write_text(SITE.replace("[talkgroups.tg]", "[talkgroups.tg]\nflor = 'mix'"))
    run.proc.send_signal(signal.SIGHUP)
    run.read_until("reload refused")
    run.read_until("talkgroups.tg.flor: unknown key; did you mean 'floor'?")
    config.write_text(SITE.replace('"source", "radio"', '"source"'))
    run.proc.send_signal(signal.SIGHUP)
    run.read_until("config applied")
    run.proc.send_signal(signal.SIGINT)
    run.read_until("shutdown:")
    assert run.proc.wait(timeout=10) == 0


def test_run_watch_applies_an_edited_file(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(SITE)
    run = Running(config, "--watch")
    run.read_until("ptt_on radio")
    config.write_text(SITE + '\n[ports.extra]\nkind = "simulated_radio"\n')
    run.read_until("config applied: ports +extra")
    run.proc.send_signal(signal.SIGTERM)
    assert "closed 3 ports" in run.read_until("shutdown:")
    assert run.proc.wait(timeout=10) == 0


def test_check_summarises_every_section_and_names_files_that_do_not_load(tmp_path: Path) -> None:
    bad_cert = tmp_path / "web.pem"
    bad_cert.write_text("not a certificate")
    site = tmp_path / "site.toml"
    sections = f"""
[web]
port = 8443
tls_certificate = "{bad_cert}"
tls_key = "{bad_cert}"

[audit]
path = "{tmp_path / "audit" / "audit.jsonl"}"

[mqtt]
host = "127.0.0.1"
ca_file = "{tmp_path / "ca.pem"}"

[mqtt.commanders]
cad1 = ["patch", "unkey"]
"""
    site.write_text(SITE + sections)
    result = borderlink("check", str(site))
    assert result.returncode == 2 and "2 problems" in result.stderr, result.stderr
    assert "web.tls_certificate: " in result.stderr and "does not load" in result.stderr
    assert f"mqtt.ca_file: {tmp_path / 'ca.pem'}: no such file" in result.stderr
    site.write_text(SITE + sections.replace("tls_", "# tls_").replace("ca_file", "# ca_file"))
    result = borderlink("check", str(site))
    assert result.returncode == 0, result.stderr
    summary = result.stdout
    assert "http://127.0.0.1:8443/" in summary
    assert f"{tmp_path / 'audit' / 'audit.jsonl'}, rotated at" in summary
    assert "broker 127.0.0.1:1883" in summary and "commander cad1: patch, unkey" in summary
    assert "source               tone" in summary and "(talks all the time; no TOT)" in summary
