"""Command line: argument parsing only; the work is in gateway.app and friends."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from gateway import __version__

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand; later modules add theirs (devices, levels, passwd)."""

    def add(handler: Callable[[argparse.Namespace], int]) -> Callable:
        COMMANDS[name] = (help, arguments, handler)
        return handler

    return add


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


@command("check", "validate a site config without starting anything", _check_args)
def check(args: argparse.Namespace) -> int:
    from gateway.site import load_site, summary, verify

    config = load_site(args.config)
    verify(config, devices=not args.no_hardware)
    print(summary(config, devices=not args.no_hardware))
    return 0


@command("run", "run the gateway for a site config (SIGHUP reloads it)", _run_args)
def run(args: argparse.Namespace) -> int:
    from gateway.app import Gateway
    from gateway.site import load_site, run_async

    config = load_site(args.config)

    async def main() -> None:
        await Gateway(config).run(seconds=args.seconds, watch=args.watch)

    run_async(main())
    return 0


@command("demo", "two linked sites (CA, US) of simulated radios with consoles; no hardware",
         _demo_args)  # fmt: skip
def demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(args.seconds, plain=args.plain)


def build_parser() -> argparse.ArgumentParser:
    import gateway.site  # noqa: F401  (registers every port kind and command)

    parser = argparse.ArgumentParser(
        prog="borderlink",
        description="BorderLink: join radios, SIP phones and browser consoles in talkgroups.",
        epilog="Start with 'borderlink demo', then 'borderlink check config/example-site.toml'.",
    )
    parser.add_argument("--version", action="version", version=f"borderlink {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, arguments, handler) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        arguments(child)
        child.set_defaults(handler=handler)
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
        return args.handler(args)
    except ConfigError as exc:  # any command reading a site file reports it the same way
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run as ``python -m gateway.cli``: this file is then __main__, while other modules
    # register their commands on ``gateway.cli``; use that one.
    from gateway.cli import main as registered_main

    sys.exit(registered_main())
