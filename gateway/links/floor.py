"""One floor on both sides of a link: each side applies the same rule to the same facts.

There is no home gateway: in a shared talkgroup whose floor is ``single``, every
side decides the holder itself, by one deterministic rule, so neither country
arbitrates for the other. The rule (:func:`rank`), as in the local floor
(``gateway.floor``) with the border's two additions first and last:

1. an emergency pre-empts everyone else;
2. then the higher priority (0-7 on the wire);
3. then the earliest key-up — the holder keeps the floor against later talkers of
   equal rank, just as the local floor keeps it for whoever has talked longest;
4. then the lower site ID, for two key-ups in the same millisecond
   (and the lower talker ID, for two talkers of one site in that millisecond).

To converge, each side tells its peers the best of its *own* candidates (its
radios, phones and consoles asking for the floor, past anti-kerchunk) — whether
or not that one holds the shared floor — and keeps the latest report of each
peer. Each side then holds the same facts one one-way delay after the last
key-up or let-go, and picks the same holder: within one round trip, as the issue
asks. The best of the union of everyone's bests is the best of all candidates,
so reporting one per side is enough; and a peer speaks only for its own site
(:meth:`SharedFloor.heard` stamps its reports with its site ID) — or, when it relays
(:mod:`gateway.links.topology`), for the site of the talker it passes on, which it
names, so every side of a chain ranks that talker alike. A peer could lie about the
origin to win a tie in one millisecond, as it could about its key-up time: the rule
trusts each side's word about its talkers, and a site cut off for lying is cut.

Key-up times are the originating side's UTC milliseconds, carried in the talker
extension (``gateway.links.talker``): both sides compare the same numbers, so
clock skew between sites can only make "earliest" slightly unfair, never make
the sides disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from gateway.links.talker import Talker, unwrap_ms


@dataclass(frozen=True, slots=True)
class Candidate:
    """Someone asking for a shared floor, as every side sees them."""

    site: str  # the site the talker is on ([links] site_id)
    talker: int  # talker ID on that site (one per over)
    keyed_at_ms: int  # key-up time, the origin's UTC milliseconds
    priority: int = 0  # 0-7
    emergency: bool = False

    @staticmethod
    def from_talker(site: str, talker: Talker, now_ms: int) -> Candidate | None:
        """A peer's report from a received packet's talker (None when it is not keyed)."""
        if not talker.keyed:
            return None
        keyed_at = unwrap_ms(talker.keyed_at, now_ms)
        return Candidate(site, talker.talker_id, keyed_at, talker.priority, talker.emergency)


def rank(candidate: Candidate) -> tuple[bool, int, int, str, int]:
    """Sort key of the rule: the smallest ranks first."""
    return (
        not candidate.emergency,
        -candidate.priority,
        candidate.keyed_at_ms,
        candidate.site,
        candidate.talker,
    )


def choose(candidates: Iterable[Candidate]) -> Candidate | None:
    """Who holds the floor among these candidates (None: nobody asks)."""
    return min(candidates, key=rank, default=None)


ChangeKind = Literal["granted", "preempted", "resolved", "released"]


@dataclass(frozen=True, slots=True)
class FloorChange:
    """The holder changed, for the audit log, metrics and MQTT (words of ``gateway.floor``).

    ``granted``: a free floor (or one its holder let go) is given; ``preempted``:
    an emergency or a higher priority took it from a holder still talking;
    ``resolved``: a collision — a peer's earlier key-up was heard, and the side's
    own holder gives way (the loser hears the busy tone); ``released``: nobody
    asks any more.
    """

    kind: ChangeKind
    old: Candidate | None
    new: Candidate | None


class SharedFloor:
    """One shared ``single`` talkgroup's floor, as this side sees it."""

    def __init__(self, site: str) -> None:
        self.site = site
        self.local: dict[int, Candidate] = {}  # talker ID → our own candidates
        self.remote: dict[str, Candidate] = {}  # peer site → its latest report
        self.holder: Candidate | None = None

    def key_up(
        self, talker: int, keyed_at_ms: int, priority: int = 0, emergency: bool = False
    ) -> FloorChange | None:
        """One of our own talkers asks for the floor (or changes priority/emergency)."""
        self.local[talker] = Candidate(self.site, talker, keyed_at_ms, priority, emergency)
        return self._decide()

    def let_go(self, talker: int) -> FloorChange | None:
        """One of our own talkers stops asking (unkeyed, TOT, call ended)."""
        self.local.pop(talker, None)
        return self._decide()

    def heard(self, peer: str, report: Candidate | None) -> FloorChange | None:
        """A peer's latest report: its best own candidate, or None (unkeyed, link down, cut).

        The report is stamped with ``peer`` whatever site it names: a peer speaks for
        itself only.
        """
        if peer == self.site:
            raise ValueError(f"peer {peer!r} has this side's own site ID; site IDs must differ")
        if report is None:
            self.remote.pop(peer, None)
        else:
            self.remote[peer] = replace(report, site=peer)
        return self._decide()

    def update(
        self, local: Iterable[Candidate], remote: Mapping[str, Candidate | None]
    ) -> FloorChange | None:
        """All the facts of one moment at once (the engine's tick): our own candidates
        now, and each peer's latest report (a peer not named has none: its link is
        gone); one decision, one change at most.

        A report keeps the site it names: the peer's own, or — from a relay — the site
        of the talker it passes on (:mod:`gateway.links.topology`), so every side ranks
        that talker alike. One naming our own site is the peer's (a talker of ours never
        comes back through a relay)."""
        if self.site in remote:
            raise ValueError(f"a peer has this side's site ID {self.site!r}; site IDs must differ")
        self.local = {c.talker: replace(c, site=self.site) for c in local}
        self.remote = {
            p: r if r.site != self.site else replace(r, site=p)
            for p, r in remote.items()
            if r is not None
        }
        return self._decide()

    def report(self) -> Candidate | None:
        """What to tell every peer now: the best of our own candidates."""
        return choose(self.local.values())

    @property
    def holder_is_local(self) -> bool:
        return self.holder is not None and self.holder.site == self.site

    def may_talk(self, talker: int) -> bool:
        """Is this talker of ours heard (in the mix and across the link)?"""
        return self.holder_is_local and self.holder is not None and self.holder.talker == talker

    def _decide(self) -> FloorChange | None:
        old = self.holder
        new = choose([*self.local.values(), *self.remote.values()])
        self.holder = new
        if new == old or (new and old and (new.site, new.talker) == (old.site, old.talker)):
            return None  # same holder (its priority or emergency may have changed)
        if new is None:
            return FloorChange("released", old, None)
        if old is None or not self._still_asking(old):
            return FloorChange("granted", old, new)
        outranks = (not new.emergency, -new.priority) < (not old.emergency, -old.priority)
        return FloorChange("preempted" if outranks else "resolved", old, new)

    def _still_asking(self, candidate: Candidate) -> bool:
        if candidate.site == self.site:
            return self.local.get(candidate.talker) is not None
        return any(
            (r.site, r.talker) == (candidate.site, candidate.talker) for r in self.remote.values()
        )
