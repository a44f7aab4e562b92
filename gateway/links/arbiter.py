"""The engine's side of links, once a tick: who of ours asks, who holds a shared floor,
and what each link leg tells the peer.

The engine's own floor (:mod:`gateway.floor`) decides every mix group but those a
link shares in ``single`` floor mode: it leaves those to :meth:`Arbiter.decide`,
which runs right after it in the same tick and, for each group that holds a link
leg and has something going on:

1. turns our asking ports (past anti-kerchunk, not timed out) into floor
   candidates: a talker ID and key-up time per over (UTC ms, kept while the port
   asks), the port's priority (0-7 on the wire) and emergency flag;
2. in a shared ``single`` group, hands them and each link leg's latest report of
   its peer's best candidate (from the talker extension; a peer without it is
   one candidate, from when its voice began) to the group's
   :class:`~gateway.links.floor.SharedFloor`, and admits the holder alone —
   our port, or the link leg it is heard through — every other asker is denied
   (a local one hears the busy tone; a link leg's own side plays its loser one);
   a change of holder is a ``floor_granted`` or ``preempted`` engine event named
   with the talker's label;
3. tells each link leg the best of our candidates, whether or not it holds the
   floor (that is what lets both sides converge), with its label ``AGENCY · UNIT``.

In a ``mix`` group everyone is heard; only step 3 runs, so the far side still
knows who talks.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from gateway.links.floor import Candidate, FloorChange, SharedFloor, choose
from gateway.links.talker import fit_label, wire_priority

if TYPE_CHECKING:
    from gateway.engine import Engine
    from gateway.floor import FloorDecision
    from gateway.ports import Port


def talker_label(port: Port, site_name: str) -> str:
    """How the far side names a talker of ours: ``AGENCY · UNIT``.

    The unit is a console operator's display name, else the port's ``label``, else —
    for a call — its route (never the caller's number), else the port's name; the
    agency is the port's ``agency``, else this site's name."""
    unit = (
        getattr(port, "display", "")
        or getattr(port.config, "label", "")
        or (getattr(port, "route", "") if getattr(port, "per_call", False) else "")
        or port.name
    )
    agency = port.config.agency or site_name
    return fit_label(f"{agency} · {unit}")


class Arbiter:
    """Shared floors and talker announcements for one site (the engine's ``shared_floors``)."""

    def __init__(self, site_id: str, site_name: str) -> None:
        self.site = site_id
        self.site_name = site_name
        self.floors: dict[str, SharedFloor] = {}  # mix group name → its shared floor
        self.overs: dict[str, tuple[int, int]] = {}  # our asking port → (talker ID, key-up ms)
        self.voice_since: dict[str, int] = {}  # link leg without extension → voice began, ms
        self._next_talker = 0
        self._layout: object = None
        self._legs: list[tuple[int, Port]] = []  # (engine row, link leg) of this layout
        self._voice: dict[str, int] = {}  # voice_since of this tick
        self._labels: dict[str, str] = {}  # our port → its label (per layout)

    def _talker_id(self) -> int:
        self._next_talker = self._next_talker % 255 + 1
        return self._next_talker

    def decide(self, engine: Engine, decision: FloorDecision) -> None:
        lay = engine.layout
        assert lay.link is not None
        if self._layout is not lay:
            self._layout = lay
            self._legs = [(i, p) for i, p in enumerate(lay.ports) if lay.link[i]]
            self._labels = {}  # our port → its label, for this layout
        now = time.time()
        now_ms = int(now * 1000)
        asking = decision.admitted | decision.denied
        n_groups = len(lay.groups)
        # Groups with something going on: someone asks, a floor is held, a leg is keyed.
        live: set[int] = set()
        for i, leg in self._legs:
            onair = getattr(leg, "onair", None)
            if onair is not None:
                onair.check_stale(now)
                if onair.keyed_sent or (onair.heard is not None and onair.heard.keyed):
                    live.add(int(lay.group_of[i]))
        ours = asking & ~lay.link
        live.update(lay.group_of[asking].tolist())
        live.update(g for g, group in enumerate(lay.groups) if group.name in self.floors)
        live.discard(n_groups)
        overs: dict[str, tuple[int, int]] = {}
        self._voice: dict[str, int] = {}
        for g in sorted(live):
            members = np.flatnonzero(lay.group_of == g)
            legs = [int(i) for i in members[lay.link[members]]]
            if not legs:
                continue
            rows = {}  # talker ID → our asking port's row
            candidates = []
            for i in members[ours[members]].tolist():
                port = lay.ports[i]
                over = self.overs.get(port.name) or (self._talker_id(), now_ms)
                overs[port.name] = over
                rows[over[0]] = i
                emergency = port.name in engine.emergency or bool(getattr(port, "emergency", 0))
                candidates.append(
                    Candidate(
                        self.site, over[0], over[1], wire_priority(int(lay.priority[i])), emergency
                    )
                )
            best = choose(candidates)
            if lay.shared is not None and lay.shared[g]:
                self._shared_floor(engine, decision, g, members, legs, candidates, rows, now_ms)
            label = ""
            squelch = False
            if best is not None:
                port = lay.ports[rows[best.talker]]
                label = self._labels.get(port.name) or self._labels.setdefault(
                    port.name, talker_label(port, self.site_name)
                )
                squelch = port.half_duplex
            for i in legs:
                onair = getattr(lay.ports[i], "onair", None)
                if onair is not None:
                    onair.announce(now_ms, best, label, squelch)
        self.overs = overs
        self.voice_since = self._voice

    def _shared_floor(
        self,
        engine: Engine,
        decision: FloorDecision,
        g: int,
        members: np.ndarray,
        legs: list[int],
        candidates: list[Candidate],
        rows: dict[int, int],
        now_ms: int,
    ) -> None:
        """One shared single floor: every side picks the same holder; admit it alone."""
        lay = engine.layout
        name = lay.groups[g].name
        floor = self.floors.get(name) or SharedFloor(self.site)
        via: dict[str, int] = {}  # peer site → the link leg its talker is heard through
        remote: dict[str, Candidate | None] = {}
        for i in legs:
            leg = lay.ports[i]
            peer = getattr(leg, "peer_site", "") or leg.name
            if peer == self.site:
                continue  # misconfigured: the peer claims our site ID (refused at set-up)
            via[peer] = i
            asking = bool(decision.admitted[i] or decision.denied[i])
            locked = bool(engine.floor.locked[i])
            remote[peer] = self._report(leg, peer, asking, locked, int(lay.priority[i]), now_ms)
        old = floor.holder
        change = floor.update(candidates, remote)
        holder = floor.holder
        if holder is None and not floor.remote:
            self.floors.pop(name, None)
        else:
            self.floors[name] = floor
        winner = -1
        if holder is not None:
            winner = rows.get(holder.talker, -1) if holder.site == self.site else via[holder.site]
        asking = decision.admitted[members] | decision.denied[members]
        decision.admitted[members] = (members == winner) & asking  # a holder we cannot hear
        decision.denied[members] = asking & (members != winner)
        if change is not None:
            self._events(engine, name, change, old, winner, rows, via)

    def _report(
        self, leg: Port, peer: str, asking: bool, locked: bool, priority: int, now_ms: int
    ) -> Candidate | None:
        """A link leg's peer candidate: from its talker extension, else from its voice.

        With the extension it is the peer's word, not whether the leg asks here: the
        peer's talker holds the floor on this side too whichever way the share carries
        audio (a leg whose share brings none in, ours ``send`` or theirs ``receive``,
        never asks), through a short gap in its packets (:meth:`OnAir.report`), and
        without our anti-kerchunk (it passed its own side's). Only our time-out timer
        takes it off the floor here: a far talker it ``locked`` out (a stuck transmitter
        across the border) holds nothing on this side. Without the extension the leg is
        a candidate while its voice asks."""
        onair = getattr(leg, "onair", None)
        if onair is not None:
            return None if locked else onair.report(peer, now_ms)
        if not asking:
            return None
        since = self._voice[leg.name] = self.voice_since.get(leg.name, now_ms)
        return Candidate(peer, 0, since, wire_priority(priority))

    def _events(
        self,
        engine: Engine,
        group: str,
        change: FloorChange,
        old: Candidate | None,
        winner: int,
        rows: dict[int, int],
        via: dict[str, int],
    ) -> None:
        from gateway.engine import Event

        lay = engine.layout

        def row_of(c: Candidate | None) -> int:
            if c is None:
                return -1
            return rows.get(c.talker, -1) if c.site == self.site else via.get(c.site, -1)

        def who(i: int) -> str:
            port = lay.ports[i]
            if lay.link is not None and lay.link[i]:  # the far side's label, once heard
                return engine.talker_of(i) or getattr(port, "peer_site", "") or port.name
            return talker_label(port, self.site_name)

        tick = engine.tick_count
        if change.kind == "granted" and winner >= 0:
            engine.emit(
                Event("floor_granted", lay.ports[winner].name, group, tick=tick, talker=who(winner))
            )
        elif change.kind in ("preempted", "resolved") and winner >= 0:
            loser = row_of(old)
            how = "" if change.kind == "preempted" else " (earlier key-up)"
            if loser >= 0:
                by = f"by {who(winner)}{how}"
                engine.emit(
                    Event(
                        "preempted", lay.ports[loser].name, group, by, tick=tick, talker=who(loser)
                    )
                )
            engine.emit(
                Event("floor_granted", lay.ports[winner].name, group, tick=tick, talker=who(winner))
            )
