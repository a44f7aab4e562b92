"""A site file as ``borderlink check`` sees it: loaded, verified, summarised.

What a site can use (port kinds, sections, services) is the table in
:mod:`gateway.endpoints`; nothing needs importing first for a file to name any of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from gateway.config import (
    ConfigError,
    PortConfig,
    Problem,
    SiteConfig,
    key_lines,
    load_config,
    writable_problem,
)
from gateway.ports import check_wav
from gateway.talkgroups import plan_mix_groups
from gateway.units import format_duration

HARDWARE_ELSEWHERE = "the radio would be down until it appears (on another machine? --no-hardware)"


def load_site(path: str | Path) -> SiteConfig:
    return load_config(path)


def verify(config: SiteConfig, devices: bool = True) -> None:
    """What ``borderlink check`` sees beyond the file's own syntax: the files and
    directories the ports and sections use (a section opts in with ``file_problems()``)
    and, with ``devices``, the sound cards, PTT and squelch lines the radios name (a port
    kind opts in with ``device_problems()``): on the gateway's own machine a typo in a
    device name is found before the radio is needed; elsewhere ``--no-hardware`` skips it.
    Raises ConfigError naming each problem and its fix (``run`` does not check: such a
    port is down and retried while the rest of the site runs)."""
    problems: list[tuple[tuple[str, ...], str]] = []
    for name, port in config.ports.items():
        if not port.enabled:
            continue
        if port.kind == "file" and (problem := check_wav(port.path)):
            problems.append((("ports", name, "path"), f"{problem}; this port would be down"))
        voice = getattr(port, "voice", None) if port.kind == "simulated_radio" else None
        if voice is not None and (problem := check_wav(voice)):
            problems.append((("ports", name, "voice"), f"{problem}; this port would be down"))
        if port.kind == "recorder" and (problem := writable_problem(Path(port.directory))):
            problems.append((("ports", name, "directory"), f"{problem}; nothing would be recorded"))
        hardware = getattr(port, "device_problems", None)
        if devices and hardware is not None:
            problems.extend(
                (("ports", name, *key), f"{message}; {HARDWARE_ELSEWHERE}")
                for key, message in hardware()
            )
    for name, section in config.sections.items():  # certificates, key and password files...
        check = getattr(section, "file_problems", None)
        if check is not None:
            problems.extend(((name, *key), message) for key, message in check())
    if problems:
        file = str(config.source or "<config>")
        lines = key_lines(config.source.read_text(encoding="utf-8")) if config.source else {}
        raise ConfigError(
            file, [Problem(".".join(key), message, _line(lines, key)) for key, message in problems]
        )


def _line(lines: dict[tuple[str, ...], int], key: tuple[str, ...]) -> int | None:
    """The line of ``key``, or of the table holding it (``ptt = { device = … }`` is one line)."""
    while key and key not in lines:
        key = key[:-1]
    return lines.get(key)


def summary(config: SiteConfig, devices: bool | None = None) -> str:
    """What ``borderlink check`` prints: enough to see the site is what was meant.
    ``devices``: whether the radios' devices were found on this machine (True), not
    looked for (False), or not asked about (None)."""
    radios = [p for p in config.ports.values() if p.enabled and hasattr(p, "device_problems")]
    lines = [
        f"site {config.site.name!r} ({config.site.country}): config OK",
        f"  timing: {format_duration(config.timing.frame)} frames at {config.timing.rate} Hz "
        f"({config.timing.frame_samples} samples)",
        f"  {len(config.ports)} ports:",
    ]
    for name, port in config.ports.items():
        tg = config.talkgroup_of(name) or "(no talkgroup)"
        agency = f" [{port.agency}]" if port.agency else ""
        off = "" if port.enabled else " DISABLED"
        lines.append(
            f"    {name:<20} {port.kind:<16} {'half' if port.half_duplex else 'full'}"
            f"-duplex → {tg}{agency}{off}{_port_note(port)}"
        )
    if radios and devices is not None:
        found = "found on this machine" if devices else "not checked (--no-hardware)"
        lines.append(f"  radio devices: {found}")
    lines.append(f"  {len(config.talkgroups)} talkgroups:")
    for name, tg in config.talkgroups.items():
        lines.append(f"    {name:<20} floor={tg.floor:<6} members: {', '.join(tg.members)}")
    if config.patches:
        lines.append(f"  {len(config.patches)} patches:")
        for name, patch in config.patches.items():
            state = "on" if patch.enabled else "off (enable live)"
            lines.append(f"    {name:<20} {' + '.join(patch.talkgroups)}  [{state}]")
    groups = plan_mix_groups(config.talkgroups, config.patches)
    lines.append(f"  mix groups now: {', '.join(g.name for g in groups) or 'none'}")
    for name, section in config.sections.items():
        lines.append(f"  [{name}] configured")
        describe = getattr(section, "summary_lines", None)
        if describe is not None:  # a section may say more (links: peers, shares, fingerprint)
            lines.extend(f"    {line}" for line in describe())
    return "\n".join(lines)


def _port_note(port: PortConfig) -> str:
    """What a reader of the summary might not expect of a port."""
    if getattr(port, "talks_always", False) and port.tot == 0:
        return "  (talks all the time; no TOT)"
    if port.kind == "recorder":
        every = "over" if port.split == "over" else "UTC hour"
        keep = f", kept {port.keep_days} days" if port.keep_days else ", kept for ever"
        return f"  (a new file per start and {every} in {port.directory}{keep})"
    return ""


def single_thread_blas() -> None:
    """Keep BLAS to one thread: the engine's small per-tick matrix products ran 2–10×
    slower when OpenBLAS woke its thread pool on a 2-core machine shared with the
    sound-card and network threads."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where available: a third of the timer lateness of asyncio's loop."""
    single_thread_blas()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
