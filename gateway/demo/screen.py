"""The demo's terminal view: both sites side by side, and the narration under them.

Each column is one site as its own /metrics shows it: the link's state and round
trip, and per talkgroup who is talking (TALK), who is asking but not heard (BUSY:
another holds the floor) and which radios the gateway keys (TX), with a level
meter. Audio from the far side shows as "from across the link".
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.demo.sites import Site

WIDTH = 56
STATES = {"up": "UP", "down": "down (dialling)", "cut": "CUT here", "cut_by_peer": "CUT BY PEER"}


def _bar(db: float, width: int = 12) -> str:
    filled = 0 if db <= -60 else min(width, round((db + 60) / 60 * width))
    return "█" * filled + "·" * (width - filled)


def link_line(site: Site) -> str:
    status = site.status
    state = STATES.get(status.link_state, status.link_state)
    rtt = f"  RTT {status.rtt * 1000:.1f} ms" if status.rtt and status.link_state == "up" else ""
    return f"link {site.link}: {state}{rtt}"


def column(site: Site, labels: dict[str, str], now: float) -> list[str]:
    status = site.status
    seconds = site.engine_seconds(now)
    clock = f"{seconds:6.1f}s" if seconds is not None else "  —   "
    lines = [f"{site.country.upper()} — {labels.get('', site.key)}  {clock}", link_line(site)]
    if not site.reachable:
        return [*lines, "", "(gateway not answering)"]
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, port in sorted(status.ports.items()):
        groups.setdefault(port["talkgroup"] or "(none)", []).append((name, port))
    for talkgroup, ports in sorted(groups.items()):
        patched = "  + patched" if talkgroup in status.patched else ""
        lines += ["", f"■ {talkgroup}{patched}"]
        for name, port in ports:
            if port["kind"] == "console" and not port.get("talking"):
                continue  # a browser listening: shown only while it talks
            state = (
                "TALK"
                if port.get("talking")
                else "BUSY"
                if port.get("squelch_open")
                else "TX  "
                if port.get("ptt_keyed")
                else "    "
            )
            label = labels.get(name, name)
            db = port.get("receive_level_dbfs", -120.0)
            lines.append(f" {state} {label[:28]:<28} {_bar(db)}")
        if site.remote_talkers(talkgroup):
            lines.append(" TALK ⇄ from across the link")
    return lines


def render(
    sites: Iterable[Site],
    labels: dict[str, dict[str, str]],
    header: list[str],
    narration: list[str],
    now: float,
) -> str:
    a, b = (column(site, labels.get(site.key, {}), now) for site in sites)
    rows = [f"{left:<{WIDTH}}│ {right}" for left, right in _zip(a, b)]
    return "\n".join([*header, "", *rows, "", "─" * (2 * WIDTH), *narration])


def _zip(a: list[str], b: list[str]) -> list[tuple[str, str]]:
    n = max(len(a), len(b))
    return list(zip(a + [""] * (n - len(a)), b + [""] * (n - len(b)), strict=True))
