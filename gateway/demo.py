"""``borderlink demo``: a site of simulated radios and a live view of who talks where.

The demo joins and splits its configured patches every ``PATCH_EVERY`` seconds,
so within a minute one sees a patch carry traffic across talkgroups.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import gateway
from gateway.app import Gateway
from gateway.engine import Engine
from gateway.site import load_site, run_async

PATCH_EVERY = 20.0
QUIET_DB = -90.0  # below this the meter shows no signal
DEMO_CONFIG = Path(gateway.__file__).resolve().parent.parent / "config" / "demo.toml"


def run_demo(config: Path | None, seconds: float | None, plain: bool = False) -> int:
    path = config or DEMO_CONFIG
    if not path.exists():
        print(f"demo config not found at {path}; pass one with --config", file=sys.stderr)
        return 2
    site = load_site(path)  # a ConfigError is reported by the command line
    live = sys.stdout.isatty() and not plain

    async def main() -> None:
        gw = Gateway(site)
        tasks = [asyncio.create_task(_toggle_patches(gw))]
        if live:
            tasks.append(asyncio.create_task(_screen(gw)))
        try:
            await gw.run(seconds=seconds)
        finally:
            for task in tasks:
                task.cancel()

    run_async(main())
    return 0


async def _toggle_patches(gw: Gateway) -> None:
    while True:
        await asyncio.sleep(PATCH_EVERY)
        for name in gw.engine.patches:
            gw.engine.set_patch(name, name not in gw.engine.active_patches)


async def _screen(gw: Gateway) -> None:
    while True:
        sys.stdout.write("\x1b[H\x1b[2J" + render(gw.engine, gw.config.site.name) + "\n")
        sys.stdout.flush()
        await asyncio.sleep(0.25)


def _bar(db: float, width: int = 20) -> str:
    filled = 0 if db <= -60 else round((db + 60) / 60 * width)
    return "█" * filled + "·" * (width - filled)


def render(engine: Engine, title: str) -> str:
    """One screen: each mix group, its floor, and each port's state and levels."""
    seconds = engine.tick_count * engine.frame_seconds
    lines = [f"BorderLink demo — {title} — {seconds:6.1f}s   (Ctrl-C to stop)", ""]
    layout = engine.layout
    for g, group in enumerate(layout.groups):
        patched = f"  PATCHED via {', '.join(group.patches)}" if group.patched else ""
        lines.append(f"■ {group.name}  floor={group.floor}{patched}")
        for i, port in enumerate(layout.ports):
            if layout.group_of[i] != g:
                continue
            state = ("TALK " if engine.admitted[i] else "BUSY " if engine.denied[i]
                     else "TX   " if engine.keying.keyed[i] else "     ")  # fmt: skip
            agency = getattr(port.config, "agency", "")
            rx, tx = float(engine.rx_dbfs[i]), float(engine.tx_dbfs[i])
            rx_txt = f"{rx:6.1f}" if rx > QUIET_DB else "   -∞ "
            tx_txt = f"{tx:6.1f}" if tx > QUIET_DB else "   -∞ "
            lines.append(f"   {state} {port.name:<14} {agency:<6} rx {_bar(rx)} {rx_txt} dBFS"
                         f"   tx {_bar(tx)} {tx_txt} dBFS")  # fmt: skip
        lines.append("")
    return "\n".join(lines)
