"""A card that vanishes entirely comes back by itself: the JACK server is killed and started
again under the same name while the gateway runs.

PortAudio cannot stop a stream whose server died (it waits ten minutes) nor rescan
without being re-initialised, so this is the path where the gateway kills each card's
process and starts fresh ones, with backoff, until the server is back. Checked by
content: a 1 kHz tone into radio A comes out of radio B at its level,
and B's PTT (a CM108 keyer writing to a file standing in for /dev/hidrawN) keys again.
On a starved machine a tick can come too late and leave a gap: every gap must be a loss
the gateway counted (``tone_gaps``), and the audio between them the tone, unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.hardware import failsafe_site
from tests.hardware.gwrun import build, drive, losses_seen
from tests.hardware.jackradio import (
    LEAST_WAIT_S,
    RATE,
    RadioSim,
    card_client,
    hid_keyed,
    site_toml,
    start_jackd,
    stop_jackd,
    tone,
    tone_gaps,
)
from tests.hardware.test_radio_failsafe import gateway_process, statuses
from tests.waiting import wait_for

pytestmark = pytest.mark.jack
LEVEL = -12.0
# An over long enough that a starved machine's gaps leave tone to judge between them
# (at load 17, 0.75 s of B's audio was once all gaps).
OVER_S = 3.0


def site(tmp_path, hid) -> str:
    radio = """
kind = "soundcard"
device = "system"
host_api = "JACK"
ptt_hang_time = "100ms"
squelch = { type = "vox", threshold_dbfs = -45, hang = "100ms" }
"""
    other = (
        '\n[ports.other]\nkind = "simulated_radio"\ntalk_offset = "1h"\n'
        '[ports.beacon]\nkind = "tone"\n[talkgroups.elsewhere]\nmembers = ["beacon", "other"]\n'
    )
    b = radio + f'ptt = {{ type = "cm108", device = "{hid}" }}\n'
    return site_toml({"radio_a": radio, "radio_b": b}) + other


def over_a_to_b(server: str, hid, gateway: subprocess.Popen) -> tuple[np.ndarray, int]:
    """Radio A hears a tone; returns what radio B's transmitter got while keyed, and the
    losses the gateway counted meanwhile."""
    before = counted_since(gateway, time.monotonic())
    sim = RadioSim(server, 2, seconds=10)
    try:
        sim.connect(0, card_client("radio_a"))
        sim.connect(1, card_client("radio_b"))
        signal_a = tone(1000, OVER_S, LEVEL)
        start = sim.start(0, signal_a)
        wait_for(lambda: hid_keyed(hid) is True, LEAST_WAIT_S, "radio B's PTT to key")
        wait_for(
            lambda: sim.frame > start + len(signal_a) + RATE // 4, LEAST_WAIT_S, "the over to end"
        )
        heard = sim.recorded(1, since=start)
    finally:
        sim.close()
    return heard, counted_since(gateway, time.monotonic()) - before


def counted_since(gateway: subprocess.Popen, moment: float) -> int:
    """The losses the gateway process had counted by its first report at or after ``moment``
    (``time.monotonic()``: one clock for every process)."""
    return statuses(gateway, lambda s: s.get("now", 0) >= moment)["losses"]


def check_tone(heard: np.ndarray, losses: int) -> None:
    loud = np.flatnonzero(np.abs(heard) > 0.05)
    assert loud.size, "radio B got no audio"
    steady = heard[loud[0] + RATE // 4 : loud[0] + int((OVER_S - 0.25) * RATE)]  # inside it
    tone_gaps(steady, 1000, LEVEL, losses)


def test_killed_and_restarted_audio_server_resumes_audio_and_ptt(tmp_path, monkeypatch):
    server = f"radio-replug{os.getpid()}"
    monkeypatch.setenv("JACK_DEFAULT_SERVER", server)  # restored after (RadioSim sets it)
    hid = tmp_path / "hidraw_b"
    hid.touch()
    (tmp_path / "site.toml").write_text(site(tmp_path, hid))
    jackd = start_jackd(server)
    proc = gateway_process(server, tmp_path / "site.toml", "run")
    try:
        statuses(proc, lambda s: all(s.get("up", {"-": False}).values()))
        check_tone(*over_a_to_b(server, hid, proc))  # the path works before the crash
        wait_for(
            lambda: hid_keyed(hid) is False, LEAST_WAIT_S, "radio B's PTT to drop after the over"
        )

        jackd.kill()  # the audio server crashes: no goodbye to its clients
        jackd.wait()
        down = statuses(proc, lambda s: not s.get("up", {}).get("radio_b", True))
        assert hid_keyed(hid) is False
        later = statuses(proc, lambda s: s.get("tick", 0) > down["tick"] + 25)
        assert later["other_heard"], "the other talkgroup stopped when the cards went"

        jackd = start_jackd(server)  # back, under the same name
        back = statuses(proc, lambda s: all(s.get("up", {"-": False}).values()), 40)
        assert back["reopens"] >= 1
        check_tone(*over_a_to_b(server, hid, proc))  # audio flows A→B again, B keys again
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        stop_jackd(jackd)
        log = proc.stderr.read()
        print(log[-3000:])  # shown when the test fails
    assert code == 0, log[-2000:]
    assert hid_keyed(hid) is False


def test_card_missing_at_start_comes_up_when_its_server_starts(tmp_path, monkeypatch):
    """No JACK server when the gateway starts: the radio is down, the rest runs; when the
    server appears the card's next process finds it and the radio transmits what its
    talkgroup carries — a 1 kHz tone, checked at the radio's mic input."""
    server = f"radio-late{os.getpid()}"
    monkeypatch.setenv("JACK_DEFAULT_SERVER", server)
    hid = tmp_path / "hidraw_b"
    hid.touch()
    radio = f"""
kind = "soundcard"
device = "system"
host_api = "JACK"
sample_rate = 48000   # nothing to ask the rate of yet
squelch = {{ type = "none" }}
ptt = {{ type = "cm108", device = "{hid}" }}
"""
    source = f'kind = "tone"\ntone_hz = 1000\nlevel_dbfs = {LEVEL}'
    (tmp_path / "site.toml").write_text(site_toml({"source": source, "radio_b": radio}))
    proc = gateway_process(server, tmp_path / "site.toml", "run")
    jackd = None
    try:
        statuses(proc, lambda s: s.get("tick", 0) > 25 and s.get("up") == {"radio_b": False})
        assert hid_keyed(hid) is not True, "keyed a radio whose card is not there"
        jackd = start_jackd(server)
        statuses(proc, lambda s: s.get("up") == {"radio_b": True}, 40)
        wait_for(lambda: hid_keyed(hid) is True, LEAST_WAIT_S, "radio B's PTT once its card is up")
        before = counted_since(proc, time.monotonic())
        sim = RadioSim(server, 1, seconds=5)
        try:
            sim.connect(0, card_client("radio_b"))
            at = sim.frame
            wait_for(lambda: sim.frame > at + OVER_S * RATE, LEAST_WAIT_S, "B's transmit audio")
            heard = sim.recorded(0, since=at + RATE // 4)
        finally:
            sim.close()
        tone_gaps(heard, 1000, LEVEL, counted_since(proc, time.monotonic()) - before)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        if jackd is not None:
            stop_jackd(jackd)
        log = proc.stderr.read()
        print(log[-3000:])
    assert code == 0, log[-2000:]
    assert hid_keyed(hid) is False


def test_a_card_process_killed_mid_over_drops_ptt_and_comes_back_alone(
    jack_server, radio_sim, tmp_path
):
    """Each card streams in a process of its own: if radio B's dies (a crash in the audio
    driver), B's PTT drops at once, a new process opens the card, and B carries the next
    over — while radio A's process is never touched."""
    hid = tmp_path / "hidraw_b"
    hid.touch()
    gw = build(tmp_path, site(tmp_path, hid))
    sim = radio_sim(2)
    sim.connect(0, card_client("radio_a"))
    sim.connect(1, card_client("radio_b"))
    card_a, card_b = gw.ports["radio_a"].card, gw.ports["radio_b"].card
    pid_a = card_a.stream.process.process.pid

    def scenario():
        wait_for(lambda: gw.engine.tick_count > 25, LEAST_WAIT_S, "the gateway to tick")
        first = sim.start(0, tone(1000, 3.0, LEVEL))
        wait_for(lambda: hid_keyed(hid) is True, LEAST_WAIT_S, "radio B's PTT to key")
        os.kill(card_b.stream.process.process.pid, signal.SIGKILL)
        wait_for(
            lambda: hid_keyed(hid) is False, LEAST_WAIT_S, "radio B's PTT to drop with its card"
        )
        wait_for(
            lambda: card_b.up and card_b.counts["reopens"] == 1, LEAST_WAIT_S, "radio B's card back"
        )
        sim.connect(1, card_client("radio_b"))  # a new JACK client: wire the radio again
        wait_for(lambda: sim.frame > first + int(3.5 * RATE), LEAST_WAIT_S, "the first over to end")
        before = failsafe_site.losses(gw, sim)
        start = sim.start(0, tone(1000, OVER_S, LEVEL))
        wait_for(
            lambda: sim.frame > start + (OVER_S + 0.25) * RATE,
            LEAST_WAIT_S,
            "the second over to end",
        )
        return start, losses_seen(gw, sim) - before, card_a.stream.process.process.pid

    start, lost, pid_a_after = drive(gw, scenario)
    check_tone(sim.recorded(1, since=start), lost)
    assert pid_a_after == pid_a, "radio A's card process was restarted"
    assert card_a.stats()["device_errors"] == 0 and card_a.counts["reopens"] == 0
    assert card_b.stats()["device_errors"] == 1
