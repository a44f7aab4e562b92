"""Everything a site can use, registered in one place, and the site summary.

Importing this module registers every port kind, config section, service and
CLI command, so a config file can name any of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import gateway.audit  # noqa: F401  ([audit]: the audit log of PTT, patches, calls, logins)
import gateway.links  # noqa: F401  ([links]: cross-border links, checked by 'borderlink check')
import gateway.monitoring.exporter  # noqa: F401  (/metrics, /healthz, /readyz on [web])
import gateway.mqtt  # noqa: F401  ([mqtt]: state, events and commands for CAD systems)
import gateway.ports  # noqa: F401  (simulated radio, tone, file, recorder)
import gateway.radio  # noqa: F401  (soundcard radios; 'devices' and 'levels' commands)
import gateway.sip  # noqa: F401  ([sip]: phones and PBXs join talkgroups)
import gateway.web  # noqa: F401  ([web]: the console and /metrics share it)
import gateway.webrtc  # noqa: F401  ([console]: browser dispatcher console, passwd)
from gateway.config import SiteConfig, load_config
from gateway.talkgroups import plan_mix_groups
from gateway.units import format_duration


def load_site(path: str | Path) -> SiteConfig:
    return load_config(path)


def summary(config: SiteConfig) -> str:
    """What ``borderlink check`` prints: enough to see the site is what was meant."""
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
        lines.append(f"    {name:<20} {port.kind:<16} {'half' if port.half_duplex else 'full'}"
                     f"-duplex → {tg}{agency}{off}")  # fmt: skip
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
