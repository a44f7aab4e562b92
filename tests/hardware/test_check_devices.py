"""`borderlink check` on the gateway's machine finds the radios' cards and lines, or names
each one missing with its file, line, key and fix; `--no-hardware` checks a config elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.cli import main
from tests.hardware.jackradio import site_toml

pytestmark = pytest.mark.jack


def radio(device: str, ptt: str, squelch: str) -> str:
    card = f'kind = "soundcard"\ndevice = "{device}"\nhost_api = "JACK"\n'
    return f"{card}ptt = {ptt}\nsquelch = {squelch}\n"


def line_of(site: Path, text: str) -> int:
    return next(i for i, line in enumerate(site.read_text().splitlines(), 1) if text in line)


def test_check_finds_the_card_and_lines_that_exist(jack_server, tmp_path: Path, capsys) -> None:
    leader, follower = os.openpty()  # a real tty stands in for the radio's serial port
    try:
        tty = os.ttyname(follower)
        hidraw = tmp_path / "hidraw0"  # the tests' stand-in for a CM108's /dev/hidrawN
        hidraw.write_bytes(b"")
        site = tmp_path / "site.toml"
        site.write_text(
            site_toml(
                {
                    "boat": radio(
                        "system",
                        f'{{ type = "serial", device = "{tty}" }}',
                        f'{{ type = "serial", device = "{tty}", line = "cts" }}',
                    ),
                    "shore": radio("system", f'{{ type = "cm108", device = "{hidraw}" }}', "{}"),
                }
            )
        )
        assert main(["check", str(site)]) == 0
        out = capsys.readouterr().out
        assert "config OK" in out and "radio devices: found on this machine" in out
    finally:
        os.close(leader)
        os.close(follower)


def test_check_names_every_missing_device_and_can_skip_them(
    jack_server, tmp_path: Path, capsys
) -> None:
    site = tmp_path / "site.toml"
    gone = tmp_path / "ttyUSB7"
    site.write_text(
        site_toml(
            {
                "boat": radio(
                    "Nonexistent USB fob",
                    f'{{ type = "serial", device = "{gone}" }}',
                    '{ type = "gpio", chip = "/dev/gpiochip99", line = 4 }',
                ),
                "shore": radio(
                    "system",
                    f'{{ type = "cm108", device = "{tmp_path / "hidraw9"}" }}',
                    f'{{ type = "cm108", device = "{tmp_path / "hidraw9"}" }}',
                ),
            }
        )
    )
    assert main(["check", str(site)]) == 2
    err = capsys.readouterr().err
    assert "5 problems" in err, err
    boat = line_of(site, "Nonexistent USB fob")
    assert (
        f"site.toml:{boat}: ports.boat.device: no sound card named like 'Nonexistent USB fob'"
        in err
    )
    assert "system" in err and "JACK" in err  # the card that does exist is listed
    ptt = line_of(site, str(gone))
    assert f"site.toml:{ptt}: ports.boat.ptt.device: {gone}: no such device" in err
    assert "ports.boat.squelch.chip: /dev/gpiochip99: no such device" in err
    assert f"ports.shore.ptt.device: {tmp_path / 'hidraw9'}: no such device" in err
    assert f"ports.shore.squelch.device: {tmp_path / 'hidraw9'}: no such device" in err
    assert "borderlink devices" in err and "--no-hardware" in err  # the fixes

    assert main(["check", "--no-hardware", str(site)]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "radio devices: not checked (--no-hardware)" in out
