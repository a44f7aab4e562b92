"""Finding the radio's sound card and control lines by name, the way an installer names them.

USB card indexes change with plug order, so a site names a card by a piece of
its name ("CM108", "USB Audio Device") and optionally its host API ("ALSA",
"JACK"); an index is allowed for a bench set-up. A name that matches nothing is an
error listing what does exist; a name that matches several is an error too
(listing them), so the gateway never silently picks the wrong radio.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

CM108_VENDORS = {"0d8c": "C-Media (CM108/CM119)", "0d8C": "C-Media"}


class DeviceNotFound(LookupError):
    """No (or no single) device matches; the message lists what exists."""


@dataclass(frozen=True)
class Card:
    index: int
    name: str
    host_api: str
    inputs: int
    outputs: int
    default_rate: float

    def line(self) -> str:
        return (
            f"{self.index:>3}  {self.name:<40} {self.host_api:<28} in {self.inputs:>2}  "
            f"out {self.outputs:>2}  {self.default_rate:>7.0f} Hz"
        )


def sound_cards() -> list[Card]:
    """Every device PortAudio sees now."""
    import sounddevice as sd

    apis = sd.query_hostapis()
    return [
        Card(
            d["index"],
            d["name"],
            apis[d["hostapi"]]["name"],
            d["max_input_channels"],
            d["max_output_channels"],
            d["default_samplerate"],
        )
        for d in sd.query_devices()
    ]


def find_card(
    device: str | int,
    host_api: str | None = None,
    inputs: int = 1,
    outputs: int = 1,
    cards: list[Card] | None = None,
) -> Card:
    """The one card matching ``device`` (index, or case-insensitive name substring)."""
    cards = sound_cards() if cards is None else cards
    listing = (
        "\n".join("  " + c.line() for c in cards)
        or "  (none: is the card plugged in, and for JACK is the server running?)"
    )
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        index = int(device)
        match = [c for c in cards if c.index == index]
        if not match:
            raise DeviceNotFound(f"no sound card with index {index}; the cards are:\n{listing}")
    else:
        want = device.lower()
        match = [c for c in cards if want in c.name.lower()]
        if host_api:
            match = [c for c in match if host_api.lower() in c.host_api.lower()]
        if not match:
            api = f" on host API {host_api!r}" if host_api else ""
            raise DeviceNotFound(
                f"no sound card named like {device!r}{api}; the cards are:\n{listing}"
            )
        if len(match) > 1:
            names = "\n".join("  " + c.line() for c in match)
            raise DeviceNotFound(
                f"{device!r} matches {len(match)} sound cards; "
                f"use a longer name or host_api:\n{names}"
            )
    card = match[0]
    if card.inputs < inputs or card.outputs < outputs:
        raise DeviceNotFound(
            f"sound card {card.name!r} has {card.inputs} inputs and {card.outputs} outputs; "
            f"this radio needs input channel {inputs} and output channel {outputs}"
        )
    return card


@dataclass(frozen=True)
class ControlDevice:
    kind: str  # serial, cm108, hidraw, gpio
    path: str
    detail: str

    def line(self) -> str:
        return f"  {self.kind:<7} {self.path:<22} {self.detail}"


def _sysfs(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def control_devices(dev: str = "/dev", sys: str = "/sys") -> list[ControlDevice]:
    """Serial ports, HID raw devices (CM108/CM119 marked) and GPIO chips that could key a radio."""
    found: list[ControlDevice] = []
    by_id = {os.path.realpath(p): p for p in glob.glob(f"{dev}/serial/by-id/*")}
    for path in sorted(
        glob.glob(f"{dev}/ttyUSB*") + glob.glob(f"{dev}/ttyACM*") + glob.glob(f"{dev}/ttyS[0-9]*")
    ):
        name = os.path.basename(path)
        if name.startswith("ttyS") and not os.path.exists(f"{sys}/class/tty/{name}/device/driver"):
            continue
        found.append(ControlDevice("serial", path, by_id.get(path, "")))
    for path in sorted(glob.glob(f"{dev}/hidraw*")):
        uevent = _sysfs(f"{sys}/class/hidraw/{os.path.basename(path)}/device/uevent")
        info = dict(line.split("=", 1) for line in uevent.splitlines() if "=" in line)
        hid_id = info.get("HID_ID", "")  # bus:vendor:product, hex
        parts = hid_id.split(":")
        vendor = parts[1][-4:].lower() if len(parts) == 3 else ""
        kind = "cm108" if vendor == "0d8c" else "hidraw"
        found.append(ControlDevice(kind, path, info.get("HID_NAME", hid_id)))
    for path in sorted(glob.glob(f"{dev}/gpiochip*")):
        label = _sysfs(f"{sys}/bus/gpio/devices/{os.path.basename(path)}/label") or _sysfs(
            f"{sys}/class/gpio/{os.path.basename(path)}/label"
        )
        found.append(ControlDevice("gpio", path, label))
    return found


UDEV_HINT = (
    "CM108/CM119 PTT needs write access to its /dev/hidrawN; a udev rule such as\n"
    '  SUBSYSTEM=="hidraw", ATTRS{idVendor}=="0d8c", GROUP="audio", MODE="0660"\n'
    "in /etc/udev/rules.d/90-borderlink-cm108.rules (then 'udevadm trigger') gives it to the\n"
    "audio group. Serial ports need the dialout group; GPIO chips the gpio group."
)


def card_problem(device: str | int, host_api: str | None, inputs: int, outputs: int) -> str:
    """Why the radio's card would not be found here ("" when exactly one card matches)."""
    try:
        find_card(device, host_api, inputs, outputs)
    except DeviceNotFound as exc:
        return str(exc)
    except OSError as exc:  # PortAudio itself is missing
        return f"cannot list sound cards ({exc}); install libportaudio2"
    return ""


def line_problem(path: str) -> str:
    """Why a PTT or squelch device could not be used here ("" when it could).

    Looked up, never opened: opening a serial port raises RTS and DTR, which keys
    some radios, and a running gateway may hold the device."""
    if not os.path.exists(path):
        kinds = ", ".join(d.path for d in control_devices()) or "none"
        return (
            f"{path}: no such device (unplugged, or the wrong name; lines here: {kinds}; "
            "'borderlink devices' lists them)"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        try:
            import grp

            group = f"group {grp.getgrgid(os.stat(path).st_gid).gr_name!r}"
        except (KeyError, OSError):
            group = "its group"
        return (
            f"{path}: this user may not read and write it (add the gateway's user to "
            f"{group}, or a udev rule: 'borderlink devices' shows one)"
        )
    return ""
