"""Command line: argument parsing only; the work is in gateway.app and friends.

The entry point. Its own commands are below; each endpoint's (``devices``, ``link``,
``passwd``...) are named in :mod:`gateway.endpoints`, imported when the parser is built
and run, so ``--version`` and ``--help`` load no NumPy, aiortc or cryptography.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gateway import __version__
from gateway.endpoints import ENDPOINTS, Command, commands, load


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the site's TOML file")


def _run_args(parser: argparse.ArgumentParser) -> None:
    _config_arg(parser)
    parser.add_argument("--watch", action="store_true", help="reload when the file changes")
    parser.add_argument("--seconds", type=float, help="stop after this many seconds")


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, help="stop after this many seconds")
    parser.add_argument("--plain", action="store_true", help="log lines instead of a live screen")


def _check_args(parser: argparse.ArgumentParser) -> None:
    _config_arg(parser)
    parser.add_argument(
        "--no-hardware",
        action="store_true",
        help="do not look for the radios' sound cards, PTT and squelch lines (for checking "
        "a config on another machine than the gateway's)",
    )


def check(args: argparse.Namespace) -> int:
    from gateway.site import load_site, summary, verify

    config = load_site(args.config)
    verify(config, devices=not args.no_hardware)
    print(summary(config, devices=not args.no_hardware))
    return 0


def run(args: argparse.Namespace) -> int:
    from gateway.app import Gateway
    from gateway.site import load_site, run_async

    config = load_site(args.config)

    async def main() -> None:
        await Gateway(config).run(seconds=args.seconds, watch=args.watch)

    run_async(main())
    return 0


def demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(args.seconds, plain=args.plain)


COMMANDS = [
    Command("check", "validate a site config without starting anything", _check_args, check),
    Command("run", "run the gateway for a site config (SIGHUP reloads it)", _run_args, run),
    Command(
        "demo",
        "two linked sites (CA, US) of simulated radios with consoles; no hardware",
        _demo_args,
        demo,
    ),
    *commands(ENDPOINTS),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="borderlink",
        description="BorderLink: join radios, SIP phones and browser consoles in talkgroups.",
        epilog="Start with 'borderlink demo', then 'borderlink check config/example-site.toml'.",
    )
    parser.add_argument("--version", action="version", version=f"borderlink {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        load(command.arguments)(child)
        child.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 1
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from gateway.config import ConfigError

    try:
        return load(args.handler)(args)
    except ConfigError as exc:  # any command reading a site file reports it the same way
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
