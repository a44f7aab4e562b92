"""The PTT guardian: no transmitter stays keyed when the gateway dies hard or hangs.

Real processes throughout: a gateway (``failsafe_site.py``, radio B keyed by a tone through
a CM108 keyer writing to a file that stands in for /dev/hidrawN) or, without an audio server,
a stand-in gateway (``ptt_client.py``) keying a serial RTS, CM108 or GPIO line; they are
killed, stopped, aborted or segfaulted from here, and the line itself is watched.
Timings are measured, not asserted (bench/ptt_guardian.py has the figures); what is asserted
is that the unkey happens, and the guardian's own heartbeat timeout.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from gateway.hardware.guardian import HEARTBEAT_TIMEOUT_S
from gateway.hardware.lines import Cm108

from tests.hardware.guarded import HERE, ROOT, fake_env, gpio_level, rts
from tests.hardware.jackradio import hid_keyed, hid_reports
from tests.hardware.test_radio_failsafe import gateway_process, keyed_site, statuses
from tests.waiting import wait_for

GENEROUS_S = 10.0  # the overall limit on a busy 2-core machine; the guardian needs ≤ 0.25 s


@pytest.fixture
def hid(tmp_path):
    path = tmp_path / "hidraw_b"
    path.touch()
    return path


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def unkeyed_after(hid: Path, since: int) -> bool:
    """An unkey report was written after the first ``since`` reports."""
    return any(not report[2] & 0x04 for report in hid_reports(hid)[since:])


def watch_until_unkeyed(keyed, what: str) -> float:
    """Poll ``keyed()`` until False; return how long it took (for the log, not asserted)."""
    start = time.monotonic()
    wait_for(lambda: keyed() is False, GENEROUS_S, what, interval=0.002)
    return time.monotonic() - start


def started(proc: subprocess.Popen) -> dict:
    return statuses(proc, lambda s: s.get("keyed"))


def finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.wait(timeout=10)


# --- the real gateway, radio B keyed through a CM108 ------------------------------------

pytest_jack = pytest.mark.jack


@pytest_jack
def test_sigkill_of_the_gateway_unkeys(jack_server, tmp_path, hid):
    site = tmp_path / "site.toml"
    site.write_text(keyed_site(hid))
    proc = gateway_process(jack_server, site, "run")
    try:
        state = started(proc)
        assert hid_keyed(hid) is True
        assert state["heartbeat_timeout"] == HEARTBEAT_TIMEOUT_S <= 0.25
        proc.kill()
        took = watch_until_unkeyed(lambda: hid_keyed(hid), "the guardian to unkey radio B")
        print(f"unkeyed {took * 1000:.1f} ms after SIGKILL")
        wait_for(lambda: not alive(state["guardian"]), GENEROUS_S, "the guardian to exit")
    finally:
        finish(proc)
    assert "PTT guardian: the gateway closed its end" in proc.stderr.read()


@pytest_jack
def test_sigstop_unkeys_and_sigcont_keys_again_only_when_the_gateway_asks(
    jack_server, tmp_path, hid
):
    site = tmp_path / "site.toml"
    site.write_text(keyed_site(hid))
    proc = gateway_process(jack_server, site, "run")
    try:
        state = started(proc)
        proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        took = watch_until_unkeyed(lambda: hid_keyed(hid), "the heartbeat timeout")
        print(f"unkeyed {took * 1000:.1f} ms after SIGSTOP")
        down = len(hid_reports(hid))
        time.sleep(max(0.0, 3.0 - (time.monotonic() - stopped)))  # the 3 s hang itself
        assert len(hid_reports(hid)) == down and hid_keyed(hid) is False, (
            "the guardian keyed the line while the gateway was stopped"
        )
        assert alive(state["guardian"])
        proc.send_signal(signal.SIGCONT)
        statuses(proc, lambda s: s.get("tick", 0) > state["tick"] and s.get("keyed"))
        assert hid_keyed(hid) is True, "radio B did not key again when the gateway asked"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    finally:
        finish(proc)
    assert hid_keyed(hid) is False
    assert "no heartbeat from the gateway" in proc.stderr.read()


@pytest_jack
def test_abort_in_the_gateway_unkeys(jack_server, tmp_path, hid):
    site = tmp_path / "site.toml"
    site.write_text(keyed_site(hid))
    proc = gateway_process(jack_server, site, "abort")
    try:
        started(proc)
        assert proc.wait(timeout=GENEROUS_S) == -signal.SIGABRT
        watch_until_unkeyed(lambda: hid_keyed(hid), "the guardian to unkey radio B")
    finally:
        finish(proc)


@pytest_jack
def test_the_guardian_killed_by_sigterm_unkeys_and_another_takes_over(jack_server, tmp_path, hid):
    site = tmp_path / "site.toml"
    site.write_text(keyed_site(hid))
    proc = gateway_process(jack_server, site, "run")
    try:
        state = started(proc)
        before = len(hid_reports(hid))
        os.kill(state["guardian"], signal.SIGTERM)
        wait_for(lambda: unkeyed_after(hid, before), GENEROUS_S, "the guardian to unkey as it goes")
        wait_for(lambda: not alive(state["guardian"]), GENEROUS_S, "the guardian to exit")
        after = statuses(proc, lambda s: s["guardian"] != state["guardian"] and s.get("keyed"))
        assert alive(after["guardian"])
        assert hid_keyed(hid) is True, (hid_reports(hid)[before:], after)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    finally:
        finish(proc)
    assert hid_keyed(hid) is False
    log = proc.stderr.read()
    assert "signal SIGTERM: every PTT line unkeyed (radio_b)" in log
    assert "starting another" in log


# --- every kind of keyer, a stand-in gateway ---------------------------------------------


@pytest.fixture
def line(request, tmp_path):
    """(kind, device, keyed()) for a serial RTS (a pty), a CM108 (a file) or a GPIO (a file)."""
    kind = request.param
    modem = tmp_path / "modem.json"
    env = fake_env(modem)
    if kind == "serial":
        master, slave = pty.openpty()
        request.addfinalizer(lambda: (os.close(master), os.close(slave)))
        return kind, os.ttyname(slave), env, lambda: rts(modem)
    if kind == "cm108":
        path = tmp_path / "hidraw0"
        path.touch()
        return kind, str(path), env, lambda: hid_keyed(path)
    chip = tmp_path / "gpiochip0"
    chip.write_text("{}")
    return kind, str(chip), env, lambda: gpio_level(chip, 17)


def client(kind: str, device: str, env: dict, mode: str = "run") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "ptt_client.py"), kind, device, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def first_keyed(proc: subprocess.Popen) -> dict:
    found: dict = {}

    def read():
        for text in proc.stdout:
            item = json.loads(text)
            if item["keyed"]:
                found.update(item)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(GENEROUS_S * 2)
    if not found:
        proc.kill()
        raise AssertionError(f"the line never keyed:\n{proc.stderr.read()}")
    return found


KINDS = ["serial", "cm108", "gpio"]


@pytest.mark.parametrize("line", KINDS, indirect=True)
@pytest.mark.parametrize("death", ["SIGKILL", "SIGSTOP", "segfault"])
def test_every_keyer_is_unkeyed_when_its_gateway_dies_or_hangs(line, death):
    kind, device, env, keyed = line
    proc = client(kind, device, env, "segv" if death == "segfault" else "run")
    try:
        state = first_keyed(proc)
        assert state["heartbeat_timeout"] == HEARTBEAT_TIMEOUT_S
        if death == "segfault":
            assert proc.wait(timeout=GENEROUS_S) == -signal.SIGSEGV
        else:
            proc.send_signal(getattr(signal, death))
        took = watch_until_unkeyed(keyed, f"the {kind} line to be unkeyed after {death}")
        print(f"{kind}: unkeyed {took * 1000:.1f} ms after {death}")
        if death == "SIGSTOP":
            assert alive(state["guardian"])
        else:
            wait_for(lambda: not alive(state["guardian"]), GENEROUS_S, "the guardian to exit")
    finally:
        finish(proc)


# --- borderlink unkey ----------------------------------------------------------------------


def unkey_site(tmp_path: Path, tty: str, hid: Path, chip: Path, extra: str = "") -> Path:
    radio = 'kind = "soundcard"\ndevice = "system"\nhost_api = "JACK"\n'
    site = tmp_path / "site.toml"
    site.write_text(f"""
[site]
name = "unkey test"
country = "US"

[ports.a]
{radio}ptt = {{ type = "serial", device = "{tty}", line = "rts" }}

[ports.b]
{radio}ptt = {{ type = "cm108", device = "{hid}" }}

[ports.c]
{radio}ptt = {{ type = "gpio", chip = "{chip}", line = 17 }}

[ports.d]
{radio}
{extra}
[talkgroups.all]
members = ["a", "b", "c", "d"]
""")
    return site


def unkey_command(site: Path, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gateway.cli", "unkey", str(site)]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_borderlink_unkey_unkeys_every_line_left_keyed(tmp_path):
    master, slave = pty.openpty()
    modem, hid, chip = tmp_path / "modem.json", tmp_path / "hidraw3", tmp_path / "gpiochip0"
    env = fake_env(modem)
    modem.write_text(json.dumps({"bits": 0x004 | 0x002, "unplugged": False}))  # RTS and DTR up
    hid.write_bytes(Cm108.report(3, True))  # a keyed report: the latch holds it
    chip.write_text(json.dumps({"17": 1}))
    site = unkey_site(tmp_path, os.ttyname(slave), hid, chip)
    try:
        done = unkey_command(site, env)
    finally:
        os.close(master)
        os.close(slave)
    assert done.returncode == 0, done.stderr
    assert not rts(modem), "serial RTS still keyed"
    assert hid_keyed(hid) is False
    assert gpio_level(chip, 17) is False
    for port in ("a:", "b:", "c:"):
        assert f"{port} PTT" in done.stdout and "unkeyed" in done.stdout
    assert "d:" not in done.stdout  # a VOX radio has no line


def test_borderlink_unkey_says_loudly_which_line_it_could_not_reach(tmp_path):
    modem, hid, chip = tmp_path / "modem.json", tmp_path / "hidraw3", tmp_path / "gpiochip0"
    env = fake_env(modem)
    chip.write_text(json.dumps({"17": 1}))
    site = unkey_site(tmp_path, str(tmp_path / "ttyUSB9"), hid, chip)  # no tty, no hidraw
    done = unkey_command(site, env)
    assert done.returncode == 1
    assert "a: PTT serial" in done.stderr and "could NOT be unkeyed" in done.stderr
    assert "b: PTT CM108" in done.stderr and "no such device" in done.stderr
    assert gpio_level(chip, 17) is False, "the line it could reach was left keyed"
