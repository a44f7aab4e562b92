"""The installer's commands against a real audio server: `devices` and `levels`."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gateway.cli import main
from tests.hardware.jackradio import (
    BLOCK,
    block_db,
    block_hz,
    card_client,
    hid_keyed,
    site_toml,
    tone,
)

pytestmark = pytest.mark.jack


def test_devices_lists_the_cards_and_the_lines(jack_server, capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "system" in out and "JACK Audio Connection Kit" in out
    assert "48000 Hz" in out
    assert "PTT / COR lines" in out and "udev" in out


def test_levels_meters_the_input_and_sends_a_test_tone(jack_server, radio_sim, tmp_path, capsys):
    hid = tmp_path / "hidraw0"
    hid.touch()
    site = tmp_path / "site.toml"
    site.write_text(
        site_toml(
            {
                "radio": f'''
kind = "soundcard"
device = "system"
host_api = "JACK"
ptt = {{ type = "cm108", device = "{hid}" }}
squelch = {{ type = "vox", threshold_dbfs = -30 }}
'''
            }
        )
    )
    result: dict = {}

    def run_levels():
        result["code"] = main(
            [
                "levels",
                str(site),
                "radio",
                "--seconds",
                "8",
                "--plain",
                "--tone",
                "1000",
                "--tone-level",
                "-12",
            ]
        )

    worker = threading.Thread(target=run_levels)
    worker.start()
    try:
        sim = radio_sim(1)
        # once the levels command's card is up: on a loaded machine that can be seconds
        # into its eight, and its last meter line must be all tone
        sim.connect(0, card_client("radio"))
        start = sim.start(0, tone(440, 14.0, -20))
    finally:
        worker.join(30)
    out = capsys.readouterr().out
    assert result["code"] == 0
    lines = [line for line in out.splitlines() if line.startswith("in ")]
    assert lines, out
    # The meter's lines while the radio's tone came in (before it: silence; a starved
    # command may miss a window): they read the tone's level, squelch open, PTT on.
    heard = [line for line in lines if float(line.split()[1]) > -60]
    assert len(heard) >= 2, lines
    level_in = float(np.median([float(line.split()[1]) for line in heard]))
    assert abs(level_in - (-20.0)) < 1.0, heard
    assert "squelch OPEN" in heard[-1] and "PTT ON" in heard[-1]
    assert "out  -12.0 dBFS" in heard[-1]
    # The command's tone, judged where it was sending: on a loaded machine the simulated
    # radio may connect late in the command's seconds, so the recording can end in
    # silence. At least half a second of it, at its level and its pitch.
    sent = sim.recorded(0, since=start)
    db = block_db(sent)
    loud = np.flatnonzero(db > -12.0 - 20)
    assert len(loud) >= 50, f"only {len(loud) * 10} ms of the test tone at the radio"
    assert abs(float(np.median(db[loud])) - (-12.0)) < 1.0, np.median(db[loud])
    pitch = np.median([block_hz(sent[k * BLOCK : (k + 1) * BLOCK]) or 0.0 for k in loud])
    assert abs(pitch - 1000) < 3, f"the test tone at {pitch:.1f} Hz"
    assert hid_keyed(hid) is False, "levels left the radio keyed"
