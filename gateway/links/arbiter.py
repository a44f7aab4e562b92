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

**Relay** (``[links] relay``, :mod:`gateway.links.topology`): in a talkgroup this site
relays, while the rule there lets it, each link leg hears the others (the mixer's
ordinary N-1, :meth:`Arbiter.link_mask`), and in step 3 a leg is told the best of our
candidates *and of the other legs' peers'*, with the origin's site, talker ID, key-up,
priority, emergency and label — so the far end's floor, console and audit name the
origin's talker and every site of a chain ranks the same candidates. Each leg is told
how this side links in its talkgroup (relay, onward, its other peers) whenever that
changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from gateway.links.floor import Candidate, FloorChange, SharedFloor, choose
from gateway.links.talker import fit_label, wire_priority
from gateway.links.topology import Topology, held_back

if TYPE_CHECKING:
    from gateway.engine import Engine, Layout
    from gateway.floor import FloorDecision
    from gateway.links.onair import OnAir
    from gateway.ports import Port
    from gateway.sip.bank import LegBank

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        site_id: str,
        site_name: str,
        relay: frozenset[str] = frozenset(),
        audit: Callable[..., None] | None = None,
    ) -> None:
        self.site = site_id
        self.site_name = site_name
        self.relay = relay  # local talkgroups this site relays between its links
        self.audit = audit
        # Relay talkgroup's mix group name → "" relaying, else why it is held back now
        self.relaying: dict[str, str] = {}
        self.held_back_total: dict[str, int] = {}  # mix group → times the relay held back
        self._relay_groups: list[tuple[int, str, list[int]]] = []  # (group, name, legs)
        # Legs whose peer must still be told how we link: said by a relay and to a relay
        # (a peer that says it relays later is answered at once: OnAir.heard_topology)
        self._unsaid: list[Port] = []
        self._mask: np.ndarray | None = None  # the mixer's "hears no link" per port
        self._relay_now: frozenset[int] = frozenset()  # groups relaying this tick
        self.floors: dict[str, SharedFloor] = {}  # mix group name → its shared floor
        self.overs: dict[str, tuple[int, int]] = {}  # our asking port → (talker ID, key-up ms)
        self.voice_since: dict[str, int] = {}  # link leg without extension → voice began, ms
        self._next_talker = 0
        self._layout: object = None
        self._legs: list[tuple[int, Port]] = []  # (engine row, link leg) of this layout
        # Legs with the talker extension, by leg bank: (bank, their rows there, (engine
        # row, OnAir) of each) — which the peer keys is one look at the bank's column.
        self._talkers: list[tuple[LegBank, np.ndarray, list[tuple[int, OnAir]]]] = []
        self._keyed_sent: list[tuple[int, OnAir]] = []  # legs that said "keyed" last tick
        self._voice: dict[str, int] = {}  # voice_since of this tick
        self._labels: dict[str, str] = {}  # our port → its label (per layout)

    def _talker_id(self) -> int:
        self._next_talker = self._next_talker % 255 + 1
        return self._next_talker

    def set_relay(self, relay: frozenset[str]) -> None:
        """A reload changed ``[links] relay``: applied at the next tick's layout check."""
        if relay != self.relay:
            self.relay = relay
            self._layout = None

    def link_mask(self, layout: Layout) -> np.ndarray | None:
        """Which ports hear no link talker this tick (the mixer's ``link``): every link
        leg, but those of a talkgroup this site relays now."""
        return self._mask if self._layout is layout else layout.link

    def _new_layout(self, lay: Layout) -> None:
        """Legs came or went: what each says of this side's links, and the relay groups."""
        assert lay.link is not None
        self._layout = lay
        self._legs = [(i, p) for i, p in enumerate(lay.ports) if lay.link[i]]
        banks: dict[int, tuple[LegBank, list[int], list[tuple[int, OnAir]]]] = {}
        for i, leg in self._legs:
            onair = getattr(leg, "onair", None)
            if onair is not None:
                _, rows, which = banks.setdefault(id(onair.bank), (onair.bank, [], []))
                rows.append(onair.row)
                which.append((i, onair))
        self._talkers = [(b, np.array(rows, np.int64), which) for b, rows, which in banks.values()]
        self._keyed_sent = [pair for _, _, which in self._talkers for pair in which]
        self._labels = {}  # our port → its label, for this layout
        by_group: dict[int, list[int]] = {}
        for i, _ in self._legs:
            by_group.setdefault(int(lay.group_of[i]), []).append(i)
        self._relay_groups = []
        self._unsaid = []
        n_groups = len(lay.groups)
        for g, legs in by_group.items():
            if g >= n_groups:
                continue
            relay = any(tg in self.relay for tg in lay.groups[g].talkgroups)
            if relay:
                self._relay_groups.append((g, lay.groups[g].name, legs))
            peers = {i: _peer(lay.ports[i]) for i in legs}
            for i in legs:
                onair = getattr(lay.ports[i], "onair", None)
                if onair is None:
                    continue
                others = frozenset(p for j, p in peers.items() if j != i and p != peers[i])
                onair.topology = Topology(relay, getattr(lay.ports[i], "onward", True), others)
                theirs = onair.peer_topology
                if relay or (theirs is not None and theirs.relay):  # only a relay needs it
                    self._unsaid.append(lay.ports[i])
        names = {name for _, name, _ in self._relay_groups}
        for name in [n for n in self.relaying if n not in names]:
            self._relay_state(name, None)
        self._relay_now = frozenset()
        self._mask = lay.link

    def _relay_check(self, lay: Layout) -> None:
        """Which relay talkgroups may forward now (the rule of :func:`held_back`)."""
        if self._unsaid:
            self._unsaid = [leg for leg in self._unsaid if not leg.onair.say_topology()]
        if not self._relay_groups:
            return
        now = set()
        for g, name, legs in self._relay_groups:
            peers = {}
            for i in legs:
                onair = getattr(lay.ports[i], "onair", None)
                peers[_peer(lay.ports[i])] = onair.peer_topology if onair is not None else None
            reason = held_back(peers)
            if self.relaying.get(name) != reason:
                self._relay_state(name, reason)
            if not reason and len(legs) > 1:
                now.add(g)
        if now != self._relay_now:
            assert lay.link is not None
            self._relay_now = frozenset(now)
            self._mask = lay.link & ~np.isin(lay.group_of, list(now))

    def _relay_state(self, group: str, reason: str | None) -> None:
        """The relay of one talkgroup starts, is held back (why), or is gone: logged, audited."""
        if reason is None:
            self.relaying.pop(group, None)
            return
        was = self.relaying.get(group)
        self.relaying[group] = reason
        if reason:
            self.held_back_total[group] = self.held_back_total.get(group, 0) + 1
            log.warning("links: relay of %s held back: %s", group, reason)
        else:
            log.info("links: relaying %s between its links", group)
        if self.audit is not None and was != reason:
            self.audit("link_relay", talkgroup=group, relaying=not reason, reason=reason)

    def decide(self, engine: Engine, decision: FloorDecision) -> None:
        lay = engine.layout
        assert lay.link is not None
        if self._layout is not lay:
            self._new_layout(lay)
        self._relay_check(lay)
        now = time.time()
        now_ms = int(now * 1000)
        asking = decision.admitted | decision.denied
        n_groups = len(lay.groups)
        # Groups with something going on: someone asks, a floor is held, a leg is keyed.
        # Idle legs cost no Python here: the peer's keyed state is a column of the leg
        # bank, and a leg that said "keyed" is in a live group, so it was announced (and
        # noted) last tick.
        live: set[int] = set()
        for bank, rows, which in self._talkers:
            for k in np.flatnonzero(bank.table.peer_keyed[rows]).tolist():
                i, onair = which[k]
                onair.check_stale(now)
                if onair.heard is not None and onair.heard.keyed:
                    live.add(int(lay.group_of[i]))
        live.update(int(lay.group_of[i]) for i, onair in self._keyed_sent if onair.keyed_sent)
        keyed_sent: list[tuple[int, OnAir]] = []
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
            relaying = g in self._relay_now
            shared = lay.shared is not None and bool(lay.shared[g])
            reports: dict[int, Candidate | None] = {}
            if shared or relaying:
                for i in legs:
                    leg = lay.ports[i]
                    peer = _peer(leg)
                    if peer == self.site:
                        continue  # misconfigured: the peer claims our site ID (refused at set-up)
                    asking = bool(decision.admitted[i] or decision.denied[i])
                    locked = bool(engine.floor.locked[i])
                    report = self._report(leg, peer, asking, locked, int(lay.priority[i]), now_ms)
                    if report is not None and report.site == self.site:
                        report = replace(report, site=peer)  # ours never comes back: the peer's
                    reports[i] = report
            if shared:
                self._shared_floor(engine, decision, g, members, reports, candidates, rows)
            best = choose(candidates)
            for i in legs:
                onair = getattr(lay.ports[i], "onair", None)
                if onair is None:
                    continue
                said = best
                if relaying:  # the best of ours and of the other legs' peers
                    said = choose([*candidates, *(r for j, r in reports.items() if j != i and r)])
                if said is None:
                    onair.announce(now_ms)
                elif said.site == self.site:
                    port = lay.ports[rows[said.talker]]
                    label = self._labels.get(port.name) or self._labels.setdefault(
                        port.name, talker_label(port, self.site_name)
                    )
                    onair.announce(now_ms, said, label, port.half_duplex)
                else:  # relayed: the origin's over, named as the leg it came in on names it
                    j = next(j for j, r in reports.items() if r == said)
                    came = lay.ports[j]
                    heard = getattr(came, "onair", None)
                    squelch = bool(heard and heard.heard and heard.heard.squelch)
                    onair.announce(now_ms, said, engine.talker_of(j), squelch, origin=said.site)
                if onair.keyed_sent:
                    keyed_sent.append((i, onair))
        self._keyed_sent = keyed_sent
        self.overs = overs
        self.voice_since = self._voice

    def _shared_floor(
        self,
        engine: Engine,
        decision: FloorDecision,
        g: int,
        members: np.ndarray,
        reports: dict[int, Candidate | None],
        candidates: list[Candidate],
        rows: dict[int, int],
    ) -> None:
        """One shared single floor: every side picks the same holder; admit it alone."""
        lay = engine.layout
        name = lay.groups[g].name
        floor = self.floors.get(name) or SharedFloor(self.site)
        # (site, talker ID) → the link leg that talker is heard through (its peer's, or
        # one a relay passes on from further away)
        via = {(r.site, r.talker): i for i, r in reports.items() if r is not None}
        remote = {_peer(lay.ports[i]): r for i, r in reports.items()}
        old = floor.holder
        change = floor.update(candidates, remote)
        holder = floor.holder
        if holder is None and not floor.remote:
            self.floors.pop(name, None)
        else:
            self.floors[name] = floor
        winner = -1
        if holder is not None:
            if holder.site == self.site:
                winner = rows.get(holder.talker, -1)
            else:
                winner = via.get((holder.site, holder.talker), -1)
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
        via: dict[tuple[str, int], int],
    ) -> None:
        from gateway.engine import Event

        lay = engine.layout

        def row_of(c: Candidate | None) -> int:
            if c is None:
                return -1
            if c.site == self.site:
                return rows.get(c.talker, -1)
            return via.get((c.site, c.talker), -1)

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


def _peer(leg: Port) -> str:
    """The site a link leg goes to (its name, for a peer without the talker extension)."""
    return getattr(leg, "peer_site", "") or leg.name
