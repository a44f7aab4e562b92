"""One floor across three sovereign gateways: three processes in a full mesh share one
``single`` talkgroup, and every collision ends with one holder everywhere.

Each gateway runs in a process of its own (``site_process.py``: its own media clock and
scheduler), linked to the other two over TLS with SRTP under the same shared name. Each
site has a radio that talks its own tone and a second radio that only listens; the busy
tone is 480 + 620 Hz. Checked by content at every site: the holder's tone is what every
listening radio hears, a loser's tone is heard nowhere, the loser hears the busy tone;
and by the floor itself: every site names the same holder (site, talker ID, key-up
time), the one the rule picks from the sites' own candidates, and its last floor event
names the holder's label.

The design bounds convergence by a round trip plus a frame; on a loaded machine ticks
and packets are late, so the test polls for the converged state with generous time-outs
and asserts what it converged on, never how fast (bench/link_floor.py measures that).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from trunk_sites import LinkSpec, SiteSpec, make_pki, site_toml

from gateway.links.floor import Candidate, choose
from tests.sip.sip_peers import run
from tests.waiting import until

HERE = Path(__file__).parent
# A tone that is there is at -20 dB (-24 for the busy tone's cadence). One that is not:
# on a loaded machine (stress-ng beside) the far side's late and concealed packets put
# artefacts of up to -47 dB into other bands of a listening radio; a loser heard for a
# single frame would show at -33 dB, and a loser heard at all at -20 dB.
HEARD = -30.0
SILENT = -40.0
BUSY_HZ = 480.0
TONES = {"a": 1000.0, "b": 1500.0, "c": 2200.0}
AGENCY = {"a": "RCMP", "b": "USCG", "c": "SEMAR"}
UNIT = {"a": "Marine 7", "b": "Cutter 41", "c": "Patrol 3"}
WAIT = 20.0  # seconds: a converged state, on a machine as busy as it gets


def label(site: str) -> str:
    return f"{AGENCY[site]} · {UNIT[site]}"


class SiteProcess:
    """A gateway in its own process; ``ask`` sends one command and reads its answer."""

    def __init__(self, name: str, path: Path, log: Path) -> None:
        self.name, self.path, self.log = name, path, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "site_process.py"),
            str(self.path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=open(self.log, "ab"),  # noqa: SIM115  (the child keeps it)
            start_new_session=True,
            limit=1 << 22,  # an answer may carry seconds of audio (op "audio")
        )

    async def ask(self, **command: object) -> dict:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        if self.proc.returncode is not None:
            raise AssertionError(f"site {self.name} exited; see {self.log}")
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), WAIT)
        if not line:
            raise AssertionError(f"site {self.name} exited; see {self.log}")
        return json.loads(line)

    async def holder(self) -> tuple | None:
        held = (await self.ask(op="state"))["holders"].get("net")
        return tuple(held) if held else None

    async def level(self, port: str, hz: float, seconds: float) -> float:
        return (await self.ask(op="levels", port=port, hz=[hz], seconds=seconds))["db"][0]

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.stdin.close()  # the site stops its gateway and exits
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def mesh(tmp: Path) -> dict[str, Path]:
    pki = make_pki(tmp, tuple(TONES))
    specs = {
        site: SiteSpec(
            site,
            {"net": hz},
            [LinkSpec(peer, peer, {"net": "mesh"}) for peer in TONES if peer != site],
            floor="single",
            agency=AGENCY[site],
            labels={"net": UNIT[site]},
            listeners=("net",),
        )
        for site, hz in TONES.items()
    }
    ports = {site: spec.tls_port for site, spec in specs.items()}
    return {site: site_toml(tmp, spec, ports, pki) for site, spec in specs.items()}


class Mesh:
    """The three site processes, and what the test asks of all of them at once."""

    def __init__(self, sites: dict[str, SiteProcess]) -> None:
        self.sites = sites
        self.candidates: list[Candidate] = []  # the last ones the rule was given

    async def all_up(self) -> bool:
        for site in self.sites.values():
            shares = (await site.ask(op="state"))["shares"]
            if len(shares) != 2 or any(s.get("mesh") != "up" for s in shares.values()):
                return False
        return True

    async def key(self, names: str, on: bool = True, emergency: bool = False) -> None:
        """These sites' radios key (or let go) in one moment: the same wall-clock instant."""
        at = time.time() + 0.3
        for name in names:
            await self.sites[name].ask(
                op="key", port="net-radio", on=on, emergency=emergency, at=at
            )
        await asyncio.sleep(max(0.0, at - time.time()) + 0.05)  # done by now (a site late
        # to run it only holds up its own part, which the callers poll for)

    async def holders(self) -> dict[str, tuple | None]:
        return {name: await site.holder() for name, site in self.sites.items()}

    async def expected(self, keyed: str) -> Candidate | None:
        """The holder by the rule, from each keyed site's own candidate (its over)."""
        candidates: list[Candidate] = []
        self.candidates = candidates
        for name in keyed:
            state = await self.sites[name].ask(op="state")
            over = state["overs"].get("net-radio")
            if over is None:
                return None  # not past anti-kerchunk yet
            talker, keyed_at, emergency = over
            candidates.append(Candidate(name, talker, keyed_at, emergency=emergency))
        return choose(candidates)

    async def converged(self, keyed: str) -> tuple[str, tuple]:
        """Wait until every site names one holder, the one the rule picks from the keyed
        sites' own candidates (until each side has heard the others, a side may name
        its own talker: a collision lasts a round trip)."""
        last: list = []

        async def one_holder() -> bool:
            held = set((await self.holders()).values())
            best = await self.expected(keyed)
            last[:] = [held, best, self.candidates]
            return (
                best is not None
                and len(held) == 1
                and next(iter(held))[:3] == (best.site, best.talker, best.keyed_at_ms)
            )

        try:
            await until(one_holder, WAIT, "all three sites to name the rule's holder")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last (holders, the rule's, candidates): {last}") from None
        (held,) = last[0]
        # ... and it holds: no site changes its holder again (not even for a tick).
        counts = {n: len((await s.ask(op="state"))["events"]) for n, s in self.sites.items()}
        for _ in range(5):
            await asyncio.sleep(0.1)
            assert set((await self.holders()).values()) == {held}
        for name, site in self.sites.items():
            events = (await site.ask(op="state"))["events"]
            assert len(events) == counts[name], f"{name} flapped: {events[counts[name] :]}"
        return held[0], held

    async def heard_only(self, winner: str, losers: str) -> None:
        """Every listening radio hears the holder's tone and no loser's; each loser's own
        radio hears the busy tone. Before the sides agreed each may have heard its own
        talker (a collision lasts a round trip): poll, then check it holds."""

        seen: dict[str, float] = {}

        async def settled() -> bool:
            seen.update(await self.snapshot())
            return (
                all(seen[f"{n}-ear {TONES[winner]:.0f}"] > HEARD for n in self.sites)
                and all(
                    seen[f"{n}-ear {TONES[x]:.0f}"] < SILENT for n in self.sites for x in losers
                )
                and all(seen[f"{x}-radio {BUSY_HZ:.0f}"] > HEARD for x in losers)
            )

        await self.until_heard(settled, f"{winner}'s tone alone at every site, {losers} busy", seen)
        await asyncio.sleep(0.5)
        for name, site in self.sites.items():
            assert await site.level("net-ear", TONES[winner], 1.0) > HEARD, name
            for loser in losers:
                assert await site.level("net-ear", TONES[loser], 1.0) < SILENT, (name, loser)
                assert await site.level("net-radio", TONES[loser], 1.0) < SILENT, (name, loser)
        assert await self.sites[winner].level("net-radio", BUSY_HZ, 1.0) < SILENT

    async def snapshot(self) -> dict[str, float]:
        """What every radio heard lately: each site's tone at each listening radio (0.6 s),
        and the busy tone and each tone at each talking radio (1 s: the busy cadence)."""
        seen = {}
        for name, site in self.sites.items():
            hz = [*TONES.values(), BUSY_HZ]
            ear = (await site.ask(op="levels", port="net-ear", hz=hz, seconds=0.6))["db"]
            own = (await site.ask(op="levels", port="net-radio", hz=hz, seconds=1.0))["db"]
            for f, e, o in zip(hz, ear, own, strict=True):
                seen[f"{name}-ear {f:.0f}"] = e
                seen[f"{name}-radio {f:.0f}"] = o
        return seen

    async def until_heard(self, check, what: str, seen: dict) -> None:  # noqa: ANN001
        try:
            await until(check, WAIT, what)
        except AssertionError as exc:
            events = {n: (await s.ask(op="state"))["events"][-6:] for n, s in self.sites.items()}
            levels = {k: round(v) for k, v in seen.items()}
            raise AssertionError(f"{exc}; last levels (dB): {levels}; events: {events}") from None

    async def events_name(
        self, kind: str, port_of: dict[str, str], talker: str, holder: str, by: str = ""
    ) -> None:
        """Every site names the holder (site ``holder``) by its label, and its latest
        ``kind`` floor event is for ``port_of[site]`` (the radio there, or the link leg
        the talker's voice comes through) and names site ``talker`` (and for a
        pre-emption, ``by`` whom). An event a site emitted in the moment before the
        talker's label (sent once per over in the dialog) arrived names its site ID."""

        def names(site: str) -> tuple[str, str]:
            return label(site), site

        async def named() -> bool:
            for name, site in self.sites.items():
                state = await site.ask(op="state")
                if state["labels"].get("net") != label(holder):
                    return False
                events = [e for e in state["events"] if e["kind"] == kind]
                if not events or events[-1]["talker"] not in names(talker):
                    return False
                if not events[-1]["port"].startswith(port_of[name]):
                    return False
                if by and not any(events[-1]["detail"].startswith(f"by {n}") for n in names(by)):
                    return False
            return True

        try:
            await until(named, WAIT, f"every site to name {label(holder)}, and a {kind} event")
        except AssertionError as exc:
            events = {n: (await s.ask(op="state"))["events"][-4:] for n, s in self.sites.items()}
            raise AssertionError(f"{exc}; last events: {events}") from None

    async def released(self, names: str) -> None:
        await self.key(names, on=False)
        await until(lambda: self._all_free(), WAIT, "the floor free everywhere")
        for name in names:  # the busy tone's cadence (0.5 s on, 0.5 off) out of the ears
            await until(lambda n=name: self._quiet(n), WAIT, f"{name}'s radio to hear nothing")

    async def _all_free(self) -> bool:
        return set((await self.holders()).values()) == {None}

    async def _quiet(self, name: str) -> bool:
        return await self.sites[name].level("net-radio", BUSY_HZ, 1.0) < SILENT


def port_of(winner: str) -> dict[str, str]:
    """Where each site hears the winner: its own radio at home, else the link leg to it.

    Link legs are named after the link and the shared name (``link-<link>-mesh…``)."""
    return {site: "net-radio" if site == winner else f"link-{winner}-" for site in TONES}


def test_three_gateways_in_a_mesh_hold_one_floor(tmp_path: Path) -> None:
    paths = mesh(tmp_path)

    async def main() -> None:
        sites = {n: SiteProcess(n, p, tmp_path / f"{n}.log") for n, p in paths.items()}
        try:
            for site in sites.values():
                await site.start()
            m = Mesh(sites)
            await until(m.all_up, 60, "all three links up")

            # (a) Two sites key in one moment: one holder everywhere, the third hears it.
            for _ in range(2):
                await m.key("ab")
                winner, _ = await m.converged("ab")
                loser = "b" if winner == "a" else "a"
                await m.heard_only(winner, loser)
                await m.events_name("floor_granted", port_of(winner), winner, winner)
                await m.released("ab")

            # (b) All three in one moment.
            await m.key("abc")
            winner, _ = await m.converged("abc")
            await m.heard_only(winner, "abc".replace(winner, ""))
            await m.events_name("floor_granted", port_of(winner), winner, winner)
            await m.released("abc")

            # (c) A holds, B is busy; C's emergency key-up takes the floor on all three.
            # The radios it pre-empted, still keyed, hear the emergency, not the busy tone.
            await m.key("a")
            await m.converged("a")
            await m.key("b")
            await m.converged("ab")
            await m.key("c", emergency=True)
            held, holder = await m.converged("abc")
            assert held == "c" and holder[3], f"the emergency does not hold: {holder}"
            await m.events_name("preempted", port_of("a"), "a", "c", by="c")
            await m.events_name("floor_granted", port_of("c"), "c", "c")

            seen: dict[str, float] = {}

            async def emergency_heard() -> bool:
                seen.update(await m.snapshot())
                return (
                    all(seen[f"{n}-ear {TONES['c']:.0f}"] > HEARD for n in sites)
                    # the pre-empted, heard nowhere
                    and all(seen[f"{n}-ear {TONES[p]:.0f}"] < SILENT for n in sites for p in "ab")
                    # and they hear the emergency, not the busy tone
                    and all(seen[f"{p}-radio {TONES['c']:.0f}"] > HEARD for p in "ab")
                    and all(seen[f"{p}-radio {BUSY_HZ:.0f}"] < SILENT for p in "ab")
                )

            await m.until_heard(
                emergency_heard, "the emergency heard everywhere, no busy tone", seen
            )
            # The emergency lets go: A, keyed first and still keyed, holds again everywhere.
            await m.key("c", on=False)
            held, _ = await m.converged("ab")
            assert held == "a"
            await m.heard_only("a", "b")
            await m.released("ab")
        finally:
            for site in sites.values():
                await site.stop()

    run(main())
