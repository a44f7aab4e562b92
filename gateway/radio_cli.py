"""Installer commands: ``borderlink devices``, ``borderlink levels PORT``, ``borderlink unkey``.

Setting a radio's levels is done with a meter, not by ear: speech from the radio
should peak around −12 dBFS on the input, and a test tone sent to the radio sets
its transmit deviation. These commands open the real card and lines exactly as
the gateway would. ``unkey`` is the last line of defence after the gateway has
stopped, however it stopped (systemd's ``ExecStopPost=``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the site's TOML file")


def devices_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dev", default="/dev", help=argparse.SUPPRESS)


def devices(args: argparse.Namespace) -> int:
    from gateway.hardware.devices import UDEV_HINT, control_devices, sound_cards

    try:
        cards = sound_cards()
    except OSError as exc:  # PortAudio missing
        print(f"cannot list sound cards: {exc}", file=sys.stderr)
        cards = []
    print("Sound cards (name a radio's card by a piece of its name, and host_api if needed):")
    print(f"{'idx':>3}  {'name':<40} {'host API':<28} channels  default rate")
    for card in cards:
        print(card.line())
    if not cards:
        print("  (none: plug the card in; for JACK start the server first)")
    lines = control_devices(args.dev)
    print("\nPTT / COR lines:")
    for dev in lines:
        print(dev.line())
    if not lines:
        print("  (no serial ports, HID raw devices or GPIO chips found)")
    print("\n" + UDEV_HINT)
    return 0


def levels_arguments(parser: argparse.ArgumentParser) -> None:
    config_argument(parser)
    parser.add_argument("port", help="the soundcard port to meter")
    parser.add_argument(
        "--tone",
        type=float,
        metavar="HZ",
        help="key the radio and send this test tone (sets TX deviation)",
    )
    parser.add_argument(
        "--tone-level",
        type=float,
        default=-12.0,
        metavar="DBFS",
        help="test tone level, dBFS (default -12)",
    )
    parser.add_argument("--seconds", type=float, help="stop after this many seconds")
    parser.add_argument("--plain", action="store_true", help="one line per update (logs, scripts)")


def meter(db: float, width: int = 30) -> str:
    """A bar from −60 to 0 dBFS, marked at the −12 dBFS speech target."""
    filled = int(min(max((db + 60) / 60, 0), 1) * width)
    bar = ["#" if i < filled else "." for i in range(width)]
    bar[int(48 / 60 * width)] = "|"
    return "".join(bar)


def levels(args: argparse.Namespace) -> int:
    from gateway.codecs.pcm import dbfs, peak_dbfs
    from gateway.codecs.tones import ToneGenerator
    from gateway.radio import SoundcardConfig, SoundcardPort
    from gateway.site import load_site

    config = load_site(args.config)
    port_cfg = config.ports.get(args.port)
    if not isinstance(port_cfg, SoundcardConfig):
        radios = [n for n, p in config.ports.items() if isinstance(p, SoundcardConfig)]
        print(
            f"{args.port!r} is not a soundcard port in {args.config}; radios: "
            f"{', '.join(radios) or 'none'}",
            file=sys.stderr,
        )
        return 2
    try:
        port = SoundcardPort(args.port, port_cfg, config.timing)
        port.open()
    except (OSError, LookupError) as exc:
        print(f"{args.port}: {exc}", file=sys.stderr)
        return 1
    tone = ToneGenerator([args.tone], config.timing.rate, args.tone_level) if args.tone else None
    frame_s = config.timing.frame
    start = next_tick = time.monotonic()
    peak_in = -120.0
    shown = 0.0
    try:
        if tone is not None:
            port.key(True)
        while args.seconds is None or time.monotonic() - start < args.seconds:
            next_tick += frame_s
            time.sleep(max(0.0, next_tick - time.monotonic()))
            port.read()
            out = tone.read(port.frame_samples) if tone is not None else None
            port.write(out)
            port.end_of_tick(next_tick)
            rx = port.last_rx
            level_in = dbfs(rx) if rx is not None else -120.0
            peak_in = max(peak_in - 0.5, peak_dbfs(rx) if rx is not None else -120.0)
            if time.monotonic() - shown < 0.1:
                continue
            shown = time.monotonic()
            level_out = dbfs(out) if out is not None else -120.0
            line = (
                f"in {level_in:6.1f} dBFS peak {peak_in:6.1f} [{meter(peak_in)}]  "
                f"out {level_out:6.1f} dBFS  squelch {'OPEN ' if port.talking else 'shut '}"
                f"PTT {'ON ' if port.ptt.keyed else 'off'}"
            )
            print(line if args.plain else "\r" + line, end="\n" if args.plain else "", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        port.key(False)
        port.close()
        if not args.plain:
            print()
    return 0


def unkey(args: argparse.Namespace) -> int:
    """Open each radio's PTT line, drive it unkeyed and release it: run after the gateway
    stops for any reason, since a CM108 latch, a GPIO pin or a serial line holds its last
    level. Exit status 1 (and a line on stderr) for a line that could not be reached."""
    from gateway.hardware.ptt import unkey as unkey_line
    from gateway.radio import SoundcardConfig, build_keyer
    from gateway.site import load_site

    config = load_site(args.config)
    failed = 0
    for name, port in config.ports.items():
        if not isinstance(port, SoundcardConfig) or port.ptt.type == "none":
            continue
        keyer = build_keyer(port.ptt)
        try:
            unkey_line(keyer)
        except (OSError, ValueError) as exc:
            failed += 1
            print(f"{name}: PTT {keyer.description} could NOT be unkeyed: {exc}", file=sys.stderr)
            continue
        print(f"{name}: PTT {keyer.description} unkeyed")
    return 1 if failed else 0
