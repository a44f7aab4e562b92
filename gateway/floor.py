"""Who is heard and who is keyed: floor control, TOT, anti-kerchunk, PTT hang time.

All per-port state is kept in arrays indexed like the engine's ports, so a tick
costs a few vector operations however many ports there are; only mix groups in
``single`` floor mode that have someone asking for the floor are looked at one
by one.

Words as radio people use them:
- *talk*: the port's COR / squelch / VOX / PTT says it has audio for us.
- *anti-kerchunk*: a talk burst must last this long before it is passed on, so a
  squelch tail or a key-up "kerchunk" does not key every transmitter on the patch.
- *TOT* (time-out timer): a talker held longer than this is cut off and locked
  out until it lets go, so a stuck microphone cannot hold the talkgroup.
- *floor*: in ``single`` mode one talker holds it; a higher priority pre-empts.
- *hang time*: a transmitter stays keyed this long after its audio stops, so a
  conversation does not chop the repeater up between overs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class FloorEvents:
    """What happened this tick, for the audit log, metrics and MQTT."""

    granted: list[tuple[int, int]] = field(default_factory=list)  # (group, port)
    preempted: list[tuple[int, int, int]] = field(default_factory=list)  # (group, old, new)
    tot_trips: list[int] = field(default_factory=list)  # ports

    def __bool__(self) -> bool:
        return bool(self.granted or self.preempted or self.tot_trips)


@dataclass
class FloorDecision:
    talk: np.ndarray  # talk after half-duplex masking (receiving radio input)
    admitted: np.ndarray  # heard in the mix this tick
    denied: np.ndarray  # asking for the floor but not given it (busy tone)
    events: FloorEvents


class FloorControl:
    """Turns raw talk into admitted talkers, per port and per mix group."""

    def __init__(self) -> None:
        self.resize(0, 0)

    def resize(
        self,
        ports: int,
        groups: int,
        keep: np.ndarray | None = None,
        group_of: np.ndarray | None = None,
    ) -> None:
        """New layout; ``keep[i]`` is the old index of new port i (or -1).

        A floor holder that is still there keeps the floor in its (possibly new)
        group, so a call joining or a patch changing does not re-arbitrate.
        """
        old_run, old_locked = getattr(self, "run", None), getattr(self, "locked", None)
        old_holder = getattr(self, "holder", np.zeros(0, np.int64))
        self.run = np.zeros(ports, np.int64)
        self.locked = np.zeros(ports, bool)
        if keep is not None and old_run is not None and old_run.size:
            has_old = keep >= 0
            self.run[has_old] = old_run[keep[has_old]]
            self.locked[has_old] = old_locked[keep[has_old]]
        self.holder = np.full(groups, -1, np.int64)
        # Nobody talked last tick (``run`` all zero), so nobody is admitted, locked out or
        # holds a floor (each of those talks): with nobody talking, :meth:`update` decides
        # nothing. A plain bool, kept here with ``run``, so an idle tick asks no array.
        self.at_rest = not self.run.any()
        if keep is not None and group_of is not None:
            new_index = {int(old): new for new, old in enumerate(keep.tolist()) if old >= 0}
            for old in old_holder[old_holder >= 0].tolist():
                new = new_index.get(old)
                if new is not None and group_of[new] < groups and self.holder[group_of[new]] < 0:
                    self.holder[group_of[new]] = new

    def update(
        self,
        raw_talk: np.ndarray,
        keyed: np.ndarray,
        half_duplex: np.ndarray,
        groups: np.ndarray,
        single: np.ndarray,
        priority: np.ndarray,
        kerchunk_ticks: np.ndarray,
        tot_ticks: np.ndarray,
    ) -> FloorDecision:
        if self.at_rest and not raw_talk.any():
            return self._quiet(len(raw_talk))
        events = FloorEvents()
        # A half-duplex radio that we are transmitting on cannot be receiving.
        talk = raw_talk & ~(half_duplex & keyed)
        self.run = np.where(talk, self.run + 1, 0)
        self.at_rest = not talk.any()
        past_kerchunk = self.run > kerchunk_ticks
        timed_out = talk & (tot_ticks > 0) & (self.run - kerchunk_ticks > tot_ticks) & ~self.locked
        if timed_out.any():
            events.tot_trips.extend(np.flatnonzero(timed_out).tolist())
        self.locked = (self.locked | timed_out) & talk
        requesting = past_kerchunk & ~self.locked

        in_group = groups < len(single)
        requesting &= in_group
        single_port = np.zeros_like(requesting)
        single_port[in_group] = single[groups[in_group]]
        contested = requesting & single_port
        admitted = requesting & ~single_port
        if contested.any() or (self.holder >= 0).any():
            self._arbitrate(contested, groups, priority, admitted, events)
        denied = requesting & ~admitted
        return FloorDecision(talk, admitted, denied, events)

    def _quiet(self, ports: int) -> FloorDecision:
        """Nobody talks, nor did last tick (most ticks of a site): nobody is admitted,
        locked or holds a floor, without the arithmetic."""
        self.locked[:] = False
        self.holder[:] = -1
        talk, admitted, denied = (np.zeros(ports, bool) for _ in range(3))  # links edit them
        return FloorDecision(talk, admitted, denied, FloorEvents())

    def _arbitrate(
        self,
        contested: np.ndarray,
        groups: np.ndarray,
        priority: np.ndarray,
        admitted: np.ndarray,
        events: FloorEvents,
    ) -> None:
        """Single-floor groups: keep, pre-empt or hand over the floor."""
        asking_groups = set(groups[contested].tolist())
        for group in np.flatnonzero(self.holder >= 0).tolist():
            if group not in asking_groups:
                self.holder[group] = -1
        for group in asking_groups:
            candidates = np.flatnonzero(contested & (groups == group))
            holder = int(self.holder[group])
            holding = holder >= 0 and contested[holder]
            # Highest priority first; among equals, whoever has been talking longest.
            best = int(candidates[np.lexsort((-self.run[candidates], -priority[candidates]))[0]])
            if not holding:
                self.holder[group] = best
                events.granted.append((group, best))
            elif priority[best] > priority[holder]:
                self.holder[group] = best
                events.preempted.append((group, holder, best))
            admitted[self.holder[group]] = True


class Keying:
    """PTT for every port that can transmit: keyed while it has audio, plus hang time."""

    def __init__(self) -> None:
        self.resize(0)

    def resize(self, ports: int, keep: np.ndarray | None = None) -> None:
        old_keyed = getattr(self, "keyed", None)
        old_quiet = getattr(self, "quiet_ticks", None)
        self.keyed = np.zeros(ports, bool)
        self.quiet_ticks = np.zeros(ports, np.int64)
        if keep is not None and old_keyed is not None and old_keyed.size:
            has_old = keep >= 0
            self.keyed[has_old] = old_keyed[keep[has_old]]
            self.quiet_ticks[has_old] = old_quiet[keep[has_old]]
        # Nothing is keyed: a tick with no audio for anyone keys nothing, and needs no
        # :meth:`update` (``quiet_ticks`` matter only to a keyed port, and audio, which
        # alone keys a port, restarts them). A plain bool, kept with ``keyed``: code that
        # unkeys a port elsewhere may leave it False, nothing else may key one.
        self.at_rest = not self.keyed.any()

    def update(
        self, has_audio: np.ndarray, blocked: np.ndarray, hang_ticks: np.ndarray
    ) -> np.ndarray:
        """New PTT state. ``blocked``: may not transmit now (receiving, or cannot transmit)."""
        self.quiet_ticks = np.where(has_audio, 0, self.quiet_ticks + 1)
        hanging = self.keyed & (self.quiet_ticks <= hang_ticks)
        self.keyed = (has_audio | hanging) & ~blocked
        self.at_rest = not self.keyed.any()
        return self.keyed
