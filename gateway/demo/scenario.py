"""The demo's script: what happens when in each 120 s cycle, and who says what.

The radios key up on their own schedules (``talk_offset``/``talk_every`` in
config/demo/*.toml); this script narrates them and does what a dispatcher or an
agency would: patch, cut and restore. Each step is timed on the clock of the site
it concerns (its engine's tick count, read from its /metrics), so the narration
and the actions line up with that site's radios even if the two gateways started
a second apart. The cut alternates: the U.S. cuts in even cycles, Canada in odd ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from gateway.demo.sites import Site

CYCLE = 120.0

# What each radio says: (espeak-ng voice, text). Canadian units speak en-GB, U.S. en-US.
LINES = {
    "rcmp_marine": (
        "en-gb",
        "Coast Guard, R C M P Marine seven. Suspect vessel southbound off White Rock.",
    ),
    "cbsa_land": (
        "en-gb-scotland",
        "C B S A Pacific Highway. We see the car in lane three, stopping it now.",
    ),
    "rcmp_dispatch": (
        "en-gb+f3",
        "Emergency traffic! All units, R C M P dispatch. "
        "Shots fired at the Pacific Highway crossing.",
    ),
    "uscg_cutter": (
        "en-us",
        "Marine seven, Coast Guard four five six one two. We have him on radar, closing in.",
    ),
    "cbp_land": (
        "en-us+m3",
        "All units, C B P Blaine. Suspect car northbound on Peace Portal Drive.",
    ),
}


@dataclass(frozen=True)
class Step:
    at: float  # second of the cycle
    site: str  # whose clock (and whose action): "ca", "us", or "cutter" (see module doc)
    say: str = ""  # narration; {cutter} and {other} name the countries
    action: str = ""  # "patch", "unpatch", "cut", "restore"


STEPS = (
    Step(2, "ca", "RCMP Marine 7 (CA) calls on the shared marine channel: heard in Blaine"),
    Step(10, "us", "USCG cutter 45612 (US) answers: heard in White Rock, across the link"),
    Step(
        18,
        "ca",
        "Cross-border patch: each side patches its land talkgroup into the shared channel",
        "patch",
    ),
    Step(18, "us", "", "patch"),
    Step(20, "us", "CBP Blaine (US land) talks: CBSA hears it in Canada through the patch"),
    Step(28, "ca", "CBSA Pacific Highway (CA land) talks: heard in Blaine"),
    Step(30, "ca", "EMERGENCY: RCMP dispatch pre-empts CBSA; both countries hear it"),
    Step(40, "ca", "Patch off: each land talkgroup is its own side's again", "unpatch"),
    Step(40, "us", "", "unpatch"),
    Step(42, "ca", "RCMP Marine 7 (CA) calls again"),
    Step(
        49,
        "cutter",
        "{cutter} cuts the link alone (sovereign cut): {other} sees 'cut by peer'",
        "cut",
    ),
    Step(50, "us", "USCG 45612 talks: nothing crosses while the link is cut"),
    Step(60, "cutter", "{cutter} restores the link: it comes back up by itself", "restore"),
    Step(80, "us", "CBP Blaine talks on U.S. land: it stays in the U.S. (land is not shared)"),
    Step(82, "ca", "RCMP Marine 7 talks: heard in Blaine again"),
    Step(88, "ca", "CBSA talks on Canadian land: it stays in Canada"),
    Step(90, "us", "USCG 45612 answers across the link"),
    Step(100, "ca", "Quiet on the air; the scenario starts again at 120 s"),
)


def cutter_of(cycle: int) -> str:
    return "us" if cycle % 2 == 0 else "ca"


class Scenario:
    """Runs the steps as each site's clock reaches them; ``say`` gets the narration."""

    def __init__(self, sites: dict[str, Site], say: Callable[[str, str], None]) -> None:
        self.sites = sites
        self.say = say
        self.done: set[tuple[int, int]] = set()  # (cycle, step index)

    def due(self, now: float) -> list[tuple[int, Step, Site]]:
        """Steps whose time has come on their site's clock, each once per cycle."""
        out = []
        for index, step in enumerate(STEPS):
            for cycle in self._cycles(step, now):
                site = self._site(step, cycle)
                seconds = site.engine_seconds(now)
                if seconds is None or (cycle, index) in self.done:
                    continue
                if seconds >= cycle * CYCLE + step.at:
                    self.done.add((cycle, index))
                    out.append((cycle, step, site))
        return out

    def _cycles(self, step: Step, now: float) -> list[int]:
        clocks = [s.engine_seconds(now) for s in self.sites.values()]
        seconds = max((c for c in clocks if c is not None), default=0.0)
        current = int(seconds // CYCLE)
        return [current - 1, current] if current else [current]

    def _site(self, step: Step, cycle: int) -> Site:
        return self.sites[cutter_of(cycle) if step.site == "cutter" else step.site]

    async def run_due(self, now: float) -> None:
        for cycle, step, site in self.due(now):
            other = next(s for s in self.sites.values() if s is not site)
            if step.say:
                text = step.say.format(cutter=site.country, other=other.country)
                self.say(f"{step.at:5.0f}s", text[0].upper() + text[1:])
            if step.action in ("patch", "unpatch"):
                site.write_config(patch=step.action == "patch")
                site.reload()
            elif step.action in ("cut", "restore"):
                await self._link(site, step.action, cycle)

    async def _link(self, site: Site, action: str, cycle: int) -> None:
        from gateway.links.control import request  # the client `borderlink link` uses

        message = {
            "action": action,
            "link": site.link,
            "reason": f"demo cycle {cycle + 1}: {site.country} acts alone",
        }
        reply = await asyncio.to_thread(request, site.config, message)
        if not reply.get("ok"):
            self.say("     ", f"{site.key.upper()}: link {action} refused: {reply.get('error')}")
