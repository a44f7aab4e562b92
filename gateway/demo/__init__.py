"""``borderlink demo``: two sites, one on each side of the border, linked on this machine.

A Canadian and a U.S. gateway, each its own ``borderlink run`` process with its
own site file (config/demo/ca.toml, us.toml), share the marine talkgroup over a
real link — SIP over TLS with SRTP, certificates made at start by a throwaway CA
per country — and keep a land talkgroup each. Each serves its dispatcher console
and /metrics on loopback; the demo prints both addresses with an operator name
and a password made for this run. Simulated radios talk a scripted scenario
(``gateway.demo.scenario``) that repeats every two minutes, narrated beside a
live view of both sites (``gateway.demo.screen``).

Everything lives in a temporary directory that is removed at the end; traffic
stays on 127.0.0.1. ``--seconds N`` ends it by itself; Ctrl-C or SIGTERM stops
both gateways cleanly (each unkeys its radios and closes its link).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import signal
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import aiohttp

from gateway.demo.pki import make_site_pki
from gateway.demo.scenario import LINES, Scenario
from gateway.demo.screen import link_line, render
from gateway.demo.sites import TEMPLATES, Site, make_sites
from gateway.demo.voices import make_voices

OPERATOR = "demo"
START_TIMEOUT = 60.0  # both gateways answering /metrics (a loaded 2-core machine is slow)


def run_demo(seconds: float | None, plain: bool = False) -> int:
    live = sys.stdout.isatty() and not plain
    if not (TEMPLATES / "ca.toml").exists():
        print(
            f"the demo's site files are not at {TEMPLATES}: run the demo from a BorderLink "
            "source tree (bash .ci/bootstrap demo)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="borderlink-demo-") as tmp:
        folder = Path(tmp)
        print(
            "Setting up: certificates for each country, radio voices, two site files…", flush=True
        )
        make_site_pki(folder / "certs", "ca", "Canada Demo Agency CA", "ca.demo.borderlink")
        make_site_pki(folder / "certs", "us", "U.S. Demo Agency CA", "us.demo.borderlink")
        voices = make_voices(folder / "voices", LINES)
        password = secrets.token_urlsafe(9)
        from gateway.webrtc.passwords import hash_password

        ca, us = make_sites(folder, hash_password(password))
        return asyncio.run(_main(ca, us, password, voices, seconds, live))


async def _main(
    ca: Site, us: Site, password: str, voices: str, seconds: float | None, live: bool
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sites = {"ca": ca, "us": us}
    labels = {key: _labels(site) for key, site in sites.items()}
    narration: collections.deque[str] = collections.deque(maxlen=9)
    t0 = time.monotonic()

    def say(when: str, text: str) -> None:
        cycle_line = f"[{when}] {text}"
        narration.append(cycle_line)
        if not live:
            print(cycle_line, flush=True)

    header = [
        "BorderLink demo — two sites linked across the border on this machine (Ctrl-C stops both)",
        f"  CA  {labels['ca']['']:<18} console {ca.url}/console/   metrics {ca.url}/metrics",
        f"  US  {labels['us']['']:<18} console {us.url}/console/   metrics {us.url}/metrics",
        f"  operator: {OPERATOR}   password: {password}   (made for this run)   radios: {voices}",
    ]
    code = 0
    try:
        for site in (ca, us):
            site.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            if not await _wait_started(session, (ca, us), stop):
                return 0 if stop.is_set() else 1  # Ctrl-C while starting is no failure
            print("\n".join(header), flush=True)
            scenario = Scenario(sites, say)
            links = {key: "" for key in sites}
            while not stop.is_set():
                now = time.monotonic()
                if seconds is not None and now - t0 >= seconds:
                    break
                if any(site.exited() is not None for site in sites.values()):
                    code = 1
                    break
                await scenario.run_due(now)
                await asyncio.gather(*(site.scrape(session) for site in sites.values()))
                for key, site in sites.items():  # link changes are narrated as they happen
                    line = link_line(site)
                    if line.split("  RTT")[0] != links[key].split("  RTT")[0]:
                        say(f"{site.key.upper():>5} ", line)
                    links[key] = line
                if live:
                    screen = render(sites.values(), labels, header, list(narration), now)
                    sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n")
                    sys.stdout.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        for site in (ca, us):
            exit_code = site.stop()
            if site.process is not None:
                keyed, unkeyed, closed = site.keyups()
                clean = exit_code == 0 and closed and keyed == unkeyed
                verdict = "stopped cleanly" if clean else f"did not stop cleanly (exit {exit_code})"
                print(
                    f"{site.key.upper()} gateway (pid {site.process.pid}): {verdict}; "
                    f"PTT keyed {keyed} times, released {unkeyed}",
                    flush=True,
                )
                if not clean:
                    code = 1
                    print(site.log_tail(), file=sys.stderr)
    return code


async def _wait_started(
    session: aiohttp.ClientSession, sites: tuple[Site, ...], stop: asyncio.Event
) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while not stop.is_set():
        for site in sites:
            if site.exited() is not None:
                print(
                    f"the {site.key.upper()} gateway stopped at start-up:\n{site.log_tail()}",
                    file=sys.stderr,
                )
                return False
        if all([await site.scrape(session) and site.started for site in sites]):
            return True
        if time.monotonic() > deadline:
            print(f"the gateways did not answer within {START_TIMEOUT:.0f} s", file=sys.stderr)
            return False
        await asyncio.sleep(0.2)
    return False


def _labels(site: Site) -> dict[str, str]:
    """What the view calls each port (its label, else its description), and '' → the
    site's name."""
    config = tomllib.loads(site.config.read_text(encoding="utf-8"))
    labels = {
        name: port.get("label") or port.get("description", name)
        for name, port in config["ports"].items()
    }
    labels[""] = config["site"]["name"]
    return labels
