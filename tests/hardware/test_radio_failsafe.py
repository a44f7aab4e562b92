"""Fail-safe PTT: every way the gateway can stop leaves the transmitter unkeyed.

Radio B's PTT is a CM108 keyer writing to a file that stands in for /dev/hidrawN;
a tone source keeps B's talkgroup audible, so B is keyed until something stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.hardware.gwrun import build, drive
from tests.hardware.jackradio import LEAST_WAIT_S, hid_keyed, site_toml, start_jackd, stop_jackd
from tests.waiting import wait_for

pytestmark = pytest.mark.jack
HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def keyed_site(hid: Path, extra_ports: str = "") -> str:
    radio = f"""
kind = "soundcard"
device = "system"
host_api = "JACK"
squelch = {{ type = "none" }}
ptt = {{ type = "cm108", device = "{hid}" }}
ptt_hang_time = "100ms"
"""
    source = 'kind = "tone"\ntone_hz = 1000\nlevel_dbfs = -12'
    return site_toml({"source": source, "radio_b": radio}) + extra_ports


@pytest.fixture
def hid(tmp_path):
    path = tmp_path / "hidraw_b"
    path.touch()
    return path


def test_normal_stop_unkeys(jack_server, tmp_path, hid):
    gw = build(tmp_path, keyed_site(hid))

    def scenario():
        wait_for(lambda: hid_keyed(hid) is True, LEAST_WAIT_S, "radio B keyed by the tone")

    drive(gw, scenario)
    assert hid_keyed(hid) is False


@pytest.mark.parametrize("change", ["removed", "changed"])
def test_reload_that_removes_or_changes_the_port_unkeys_it(jack_server, tmp_path, hid, change):
    gw = build(tmp_path, keyed_site(hid))
    old_port = gw.ports["radio_b"]

    def scenario():
        wait_for(lambda: hid_keyed(hid) is True, LEAST_WAIT_S, "radio B keyed by the tone")
        text = (tmp_path / "site.toml").read_text()
        if change == "removed":
            text = text.replace('"radio_b"', '"source"').replace("[ports.radio_b]", "[ports.old_b]")
            text = text.replace('members = ["source", "source"]', 'members = ["source"]')
        else:
            text = text.replace('ptt_hang_time = "100ms"', 'ptt_hang_time = "150ms"')
        (tmp_path / "site.toml").write_text(text)
        done = threading.Event()
        result = {}

        def reload():  # between two ticks, on the loop, as SIGHUP would
            result["r"] = gw.reload()
            done.set()

        loop = gw_loop["loop"]
        loop.call_soon_threadsafe(reload)
        assert done.wait(5)
        assert result["r"].ok, result["r"].error
        assert not old_port.ptt.keyed
        if change == "changed":  # the new port for the same radio keys again
            wait_for(lambda: gw.ports["radio_b"].ptt.keyed, LEAST_WAIT_S, "the new port to key")

    gw_loop: dict = {}
    original = gw.run

    async def run(seconds=None, watch=False):
        import asyncio

        gw_loop["loop"] = asyncio.get_running_loop()
        await original(seconds, watch)

    gw.run = run
    drive(gw, scenario)
    assert hid_keyed(hid) is False


def gateway_process(jack_server: str, site: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "JACK_DEFAULT_SERVER": jack_server, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(HERE / "failsafe_site.py"), str(site), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def statuses(proc: subprocess.Popen, until, timeout: float = LEAST_WAIT_S) -> dict:
    """Read the JSON status lines until ``until(status)``; fail after ``timeout`` (at least
    ``LEAST_WAIT_S``: a gateway process starting on a loaded machine takes that long)."""
    timeout = max(timeout, LEAST_WAIT_S)
    found: dict = {}

    def read():
        for line in proc.stdout:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if until(item):
                found.update(item)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        proc.kill()
        errors = proc.stderr.read()
        raise AssertionError(f"gateway process never reported the state; stderr:\n{errors}")
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_unkey(jack_server, tmp_path, hid, sig):
    site = tmp_path / "site.toml"
    site.write_text(keyed_site(hid))
    proc = gateway_process(jack_server, site, "run")
    statuses(proc, lambda s: s.get("keyed"))
    assert hid_keyed(hid) is True
    proc.send_signal(sig)
    assert proc.wait(timeout=10) is not None
    assert hid_keyed(hid) is False


def test_unhandled_exception_unkeys_through_atexit(jack_server, tmp_path, hid):
    site = tmp_path / "site.toml"
    site.write_text(keyed_site(hid))
    proc = gateway_process(jack_server, site, "raise")
    statuses(proc, lambda s: s.get("keyed"))
    assert proc.wait(timeout=10) == 1
    assert "a bug nobody caught" in proc.stderr.read()
    assert hid_keyed(hid) is False


def card_site(tmp_path: Path, hid: Path) -> Path:
    other = (
        '\n[ports.other]\nkind = "simulated_radio"\ntalk_offset = "1h"\n'
        '[ports.beacon]\nkind = "tone"\n[talkgroups.elsewhere]\nmembers = ["beacon", "other"]\n'
    )
    site = tmp_path / "site.toml"
    site.write_text(keyed_site(hid, other))
    return site


def test_stalled_sound_card_unkeys_is_marked_down_and_resumes(tmp_path, hid):
    """The card stops delivering audio (its server is frozen), then comes back."""
    server = f"blstall{os.getpid()}"
    jackd = start_jackd(server)
    proc = gateway_process(server, card_site(tmp_path, hid), "run")
    try:
        statuses(proc, lambda s: s.get("keyed"))
        jackd.send_signal(signal.SIGSTOP)  # no more callbacks: the card is gone
        down = statuses(proc, lambda s: not s.get("device_up", True))
        assert down["device_errors"] >= 1
        wait_for(lambda: hid_keyed(hid) is False, LEAST_WAIT_S, "PTT to drop with the card")
        later = statuses(proc, lambda s: s.get("tick", 0) > down["tick"] + 25)
        assert later["other_heard"], "the other talkgroup stopped when the card went"
        jackd.send_signal(signal.SIGCONT)  # back
        back = statuses(proc, lambda s: s.get("device_up") and s.get("reopens", 0) >= 1, 30)
        assert back["device_up"]
        statuses(proc, lambda s: s.get("keyed"), 10)
        assert hid_keyed(hid) is True, "the radio did not resume transmitting"
    finally:
        jackd.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        stop_jackd(jackd)
    assert hid_keyed(hid) is False


def test_vanished_audio_server_unkeys_and_does_not_hang_the_gateway(tmp_path, hid):
    server = f"blgone{os.getpid()}"
    jackd = start_jackd(server)
    proc = gateway_process(server, card_site(tmp_path, hid), "run")
    try:
        statuses(proc, lambda s: s.get("keyed"))
        stop_jackd(jackd)
        down = statuses(proc, lambda s: not s.get("device_up", True))
        wait_for(lambda: hid_keyed(hid) is False, LEAST_WAIT_S, "PTT to drop with the card")
        later = statuses(proc, lambda s: s.get("tick", 0) > down["tick"] + 25)
        assert later["other_heard"], "the other talkgroup stopped when the card went"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        stop_jackd(jackd)
    assert code == 0
    assert hid_keyed(hid) is False
