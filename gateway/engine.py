"""The engine: one tick pulls a frame from every port, mixes, and pushes one back.

Nothing else paces audio. The engine does not know endpoint types; it knows
ports, the mix groups the talkgroups and patches make of them, and the floor.
A port that raises or hands over garbage is isolated (silenced, unkeyed, retried
with backoff) and every other port carries on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from gateway.codecs.tones import busy_tone, courtesy_tone, talk_permit_tone
from gateway.config import PatchConfig, TalkgroupConfig, Timing
from gateway.floor import FloorControl, FloorDecision, FloorEvents, Keying
from gateway.mixer import Mixer
from gateway.ports import Port, PortBank
from gateway.talkgroups import MixGroup, plan_mix_groups
from gateway.units import db_to_gain

log = logging.getLogger(__name__)

OUT_OF_RANGE = 2.0  # a frame peaking above this is broken (wrong scale), not just hot
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
SILENCE_DB = -120.0
METER_FALL_DB_PER_S = 20.0


@dataclass(frozen=True)
class Event:
    """Something an operator or an auditor wants to know about."""

    # talk_start, talk_stop, ptt_on, ptt_off, floor_granted, preempted, tot, fault, patch,
    # joined, left (a run-time port: a call or a console, attached or detached)
    kind: str
    port: str | None = None
    group: str | None = None
    detail: str = ""  # joined/left: the port's kind
    seconds: float = 0.0  # duration, for *_stop / ptt_off / left
    tick: int = 0
    talkgroup: str | None = None  # joined/left: the talkgroup, which a left port no longer has
    by: str = ""  # patch: who asked (mqtt:SENDER, reload:SIGHUP, ...), for the audit log
    ref: str | None = None  # patch: the id of the command that asked, if one did
    label: str = ""  # the port's unit name (config ``label``, a console's operator name)
    # talk/floor events: who talks through the port when the endpoint knows (a link leg:
    # the far side's talker label, e.g. "RCMP · Marine 7"); empty: the port itself
    talker: str = ""


def _links(ports: list[Port]) -> np.ndarray | None:
    """Which ports are link legs (they hear no other link, unless their site relays the
    talkgroup: :meth:`SharedFloors.link_mask`), None when none is."""
    link = np.array([p.kind == "link" for p in ports], bool)
    return link if link.any() else None


class SharedFloors(Protocol):
    """Cross-border links (:mod:`gateway.links.arbiter`): single-floor groups that hold a
    link leg are decided by one rule on every side, and each link leg is told who of
    this side it carries. Called once a tick, after the local floor."""

    def decide(self, engine: Engine, decision: FloorDecision) -> None: ...

    def link_mask(self, layout: Layout) -> np.ndarray | None:
        """The mixer's ``link`` this tick: the link legs that hear no other link (all of
        them, but those of a talkgroup this site relays between its links)."""
        ...


@dataclass
class PortHealth:
    faults: int = 0
    bad_frames: int = 0
    down_until_tick: int = 0
    consecutive: int = 0
    last_fault: str = ""


@dataclass
class Layout:
    """Per-port parameters as arrays, rebuilt when ports, talkgroups or patches change."""

    ports: list[Port]
    groups: list[MixGroup]
    group_of: np.ndarray
    single: np.ndarray
    courtesy: np.ndarray  # per group: roger beep when a talker lets go
    talk_permit: np.ndarray  # per port: beeps when this port is given the floor
    half: np.ndarray
    can_talk: np.ndarray
    can_transmit: np.ndarray
    priority: np.ndarray
    rx_gain: np.ndarray
    tx_gain: np.ndarray
    kerchunk_ticks: np.ndarray
    tot_ticks: np.ndarray
    hang_ticks: np.ndarray
    talkgroup: list[str | None] = field(default_factory=list)
    link: np.ndarray | None = None  # per port: a cross-border link leg (None: no link here)
    shared: np.ndarray | None = None  # per group: a single floor the links decide (SharedFloors)


class Engine:
    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self.rate = timing.rate
        self.frame_samples = timing.frame_samples
        self.frame_seconds = timing.frame
        self.tick_count = 0
        self.mixer = Mixer(self.frame_samples, self.rate)
        self.floor = FloorControl()
        self.keying = Keying()
        self.busy = busy_tone(self.rate)
        self.health: dict[str, PortHealth] = {}
        self.listeners: list[Callable[[Event], None]] = []
        # Batch work for whole banks of ports (all SIP legs' decode before the reads,
        # all their encodes after the writes), so no port pays per-leg overhead.
        self.before_tick: list[Callable[[], None]] = []
        self.after_tick: list[Callable[[], None]] = []
        self.talkgroups: dict[str, TalkgroupConfig] = {}
        self.patches: dict[str, PatchConfig] = {}
        self.active_patches: set[str] = set()
        # Patches made at run time (a dispatcher at the console), not in the file: a
        # reload keeps them while their talkgroups exist (see Gateway._swap).
        self.runtime_patches: set[str] = set()
        self.attached: dict[str, tuple[str, int]] = {}  # dynamic port → (talkgroup, priority)
        self._joined_at: dict[str, int] = {}  # dynamic port → tick it joined
        self.tx_inhibit: set[str] = set()
        # Ports making an emergency call: while one holds a talkgroup's floor, the others
        # asking for it hear the emergency traffic instead of the busy tone.
        self.emergency: set[str] = set()
        self._labels: dict[str, str] = {}
        self.isolated: dict[str, int] = {}  # port → tick its retry is due
        self.last_tick_seconds = 0.0
        self.shared_floors: SharedFloors | None = None  # set by the links service
        self._set_layout([], [])

    # --- layout -------------------------------------------------------------

    @property
    def ports(self) -> list[Port]:
        return self.layout.ports

    @property
    def mix_groups(self) -> list[MixGroup]:
        return self.layout.groups

    def configure(
        self,
        ports: Iterable[Port],
        talkgroups: Mapping[str, TalkgroupConfig],
        patches: Mapping[str, PatchConfig],
        active_patches: Iterable[str] | None = None,
    ) -> None:
        """Apply a new set of ports, talkgroups and patches between two ticks.

        Ports that are the same objects as before keep their floor, TOT and PTT
        state, so a reload does not drop a keyed radio or a talker mid-word.
        """
        self.talkgroups = dict(talkgroups)
        self.patches = dict(patches)
        if active_patches is None:
            active_patches = [n for n, p in self.patches.items() if p.enabled]
        self.active_patches = {p for p in active_patches if p in self.patches}
        groups = plan_mix_groups(self.talkgroups, self.patches, self.active_patches)
        self._set_layout(list(ports), groups)

    def set_patch(self, name: str, active: bool, by: str = "", ref: str | None = None) -> None:
        """Join (or split) a configured patch live; ``by`` and ``ref`` say who asked, and
        with which command, for the audit log."""
        if name not in self.patches:
            raise KeyError(f"no patch named {name!r}; configured: {', '.join(self.patches)}")
        if (name in self.active_patches) == active:
            return
        self.active_patches = (
            (self.active_patches | {name}) if active else (self.active_patches - {name})
        )
        self.configure(self.ports, self.talkgroups, self.patches, self.active_patches)
        self._emit(
            Event(
                "patch",
                detail=f"{name} {'on' if active else 'off'}",
                tick=self.tick_count,
                by=by,
                ref=ref,
            )
        )

    def attach(self, port: Port, talkgroup: str, priority: int = 0) -> None:
        """Add a port that is not in the config file (a SIP call, a console) to a talkgroup."""
        if talkgroup not in self.talkgroups:
            raise KeyError(f"no talkgroup named {talkgroup!r}")
        if any(p.name == port.name for p in self.ports):
            raise ValueError(f"a port named {port.name!r} is already on the engine")
        self.attached[port.name] = (talkgroup, priority)
        self._joined_at[port.name] = self.tick_count
        self._set_layout([*self.ports, port], self.layout.groups)
        self._emit(
            Event(
                "joined",
                port.name,
                self._group_name(len(self.ports) - 1),
                detail=port.kind,
                tick=self.tick_count,
                talkgroup=talkgroup,
            )
        )

    def detach(self, port: Port) -> None:
        """Remove an attached port (call ended); it is unkeyed first."""
        if port not in self.ports:
            return
        i = self.ports.index(port)
        if self.keying.keyed[i]:
            self._unkey(i)
        group = self._group_name(i)
        talkgroup, _ = self.attached.pop(port.name, (None, 0))
        since = self._joined_at.pop(port.name, self.tick_count)
        self._set_layout([p for p in self.ports if p is not port], self.layout.groups)
        self.health.pop(port.name, None)  # a call's name never comes back: keep no record
        self.isolated.pop(port.name, None)
        self.emergency.discard(port.name)
        self._emit(
            Event(
                "left",
                port.name,
                group,
                detail=port.kind,
                tick=self.tick_count,
                seconds=(self.tick_count - since) * self.frame_seconds,
                talkgroup=talkgroup,
                label=getattr(port, "label", ""),
            )
        )

    def set_priority(self, name: str, priority: int) -> None:
        """Change an attached port's floor priority live (a console's emergency call).

        Only the priority array changes, so the floor holder is kept and a higher
        priority talker pre-empts it on the next tick (a ``preempted`` event).
        """
        if name not in self.attached:
            raise KeyError(
                f"{name!r} is not an attached port; configured ports take priority "
                "from their talkgroup's config"
            )
        talkgroup, _ = self.attached[name]
        self.attached[name] = (talkgroup, priority)
        i = self._index_of(name)
        if int(self.layout.group_of[i]) < len(self.layout.groups):
            self.layout.priority[i] = priority

    def set_tx_inhibit(self, name: str, inhibit: bool) -> None:
        """TX inhibit: drop this port's PTT now and keep it down until released."""
        self._index_of(name)
        if inhibit:
            self.tx_inhibit.add(name)
        else:
            self.tx_inhibit.discard(name)
        self._set_layout(self.ports, self.layout.groups)

    def set_floor_mode(self, talkgroup: str, floor: str) -> None:
        """Switch a talkgroup between ``mix`` and ``single`` live."""
        if talkgroup not in self.talkgroups:
            raise KeyError(f"no talkgroup named {talkgroup!r}")
        if floor not in ("mix", "single"):
            raise ValueError("floor must be 'mix' or 'single'")
        self.talkgroups[talkgroup] = self.talkgroups[talkgroup].model_copy(update={"floor": floor})
        self.configure(self.ports, self.talkgroups, self.patches, self.active_patches)

    def _index_of(self, name: str) -> int:
        for i, port in enumerate(self.ports):
            if port.name == name:
                return i
        raise KeyError(f"no port named {name!r}")

    def _set_layout(self, ports: list[Port], groups: list[MixGroup]) -> None:
        self._labels = {p.name: getattr(p, "label", "") for p in ports}
        old = getattr(self, "layout", None)
        old_index = {id(p): i for i, p in enumerate(old.ports)} if old else {}
        keep = np.array([old_index.get(id(p), -1) for p in ports], np.int64)
        tg_group = {tg: gi for gi, g in enumerate(groups) for tg in g.talkgroups}
        home = {m: tg for tg, cfg in self.talkgroups.items() for m in cfg.members}
        n = len(ports)
        attached = {name: tg for name, (tg, _) in self.attached.items()}
        group_of = np.full(n, len(groups), np.int64)
        priority = np.zeros(n, np.int64)
        talkgroup: list[str | None] = []
        for i, port in enumerate(ports):
            tg = home.get(port.name) or attached.get(port.name)
            talkgroup.append(tg)
            if tg is not None and tg in tg_group:
                group_of[i] = tg_group[tg]
                priority[i] = self.talkgroups[tg].priority.get(port.name, 0)
                if port.name in self.attached:
                    priority[i] = self.attached[port.name][1]

        def ticks(seconds: Iterable[float]) -> np.ndarray:
            return np.array([round(s / self.frame_seconds) for s in seconds], np.int64)

        cfgs = [p.config for p in ports]
        link = _links(ports)
        single = np.array([g.floor == "single" for g in groups], bool)
        shared = None
        if link is not None and self.shared_floors is not None:
            shared = np.zeros(len(groups) + 1, bool)
            shared[group_of[link]] = True
            shared = shared[: len(groups)] & single
        self.layout = Layout(
            ports=ports,
            groups=groups,
            group_of=group_of,
            single=single,
            courtesy=np.array(
                [any(self.talkgroups[t].courtesy_tone for t in g.talkgroups) for g in groups], bool
            ),
            talk_permit=np.array(
                [tg is not None and self.talkgroups[tg].talk_permit_tone for tg in talkgroup], bool
            ),
            half=np.array([p.half_duplex for p in ports], bool),
            can_talk=np.array([p.can_talk for p in ports], bool),
            can_transmit=np.array(
                [p.can_transmit and p.name not in self.tx_inhibit for p in ports], bool
            ),
            priority=priority,
            rx_gain=np.array([db_to_gain(c.rx_gain_db) for c in cfgs], np.float32),
            tx_gain=np.array([db_to_gain(c.tx_gain_db) for c in cfgs], np.float32),
            kerchunk_ticks=ticks(c.anti_kerchunk for c in cfgs),
            tot_ticks=ticks(c.tot for c in cfgs),
            hang_ticks=ticks(c.ptt_hang_time for c in cfgs),
            talkgroup=talkgroup,
            link=link,
            shared=shared,
        )
        self.mixer.resize(n, keep)
        self.floor.resize(n, len(groups), keep, group_of)
        self.keying.resize(n, keep)
        self.frames = np.zeros((n, self.frame_samples), np.float32)
        self.admitted = self._carry(getattr(self, "admitted", None), keep, bool)
        self.talk_since = self._carry(getattr(self, "talk_since", None), keep, np.int64)
        self.key_since = self._carry(getattr(self, "key_since", None), keep, np.int64)
        self.rx_dbfs = self._carry(getattr(self, "rx_dbfs", None), keep, np.float32, SILENCE_DB)
        self.tx_dbfs = self._carry(getattr(self, "tx_dbfs", None), keep, np.float32, SILENCE_DB)
        self._meters_down = False  # every meter at SILENCE_DB (found by the next fall)
        self.denied = np.zeros(n, bool)
        self.group_tones: dict[int, object] = {}  # group → courtesy tone playing
        self.port_tones: dict[int, object] = {}  # port → talk-permit tone playing
        for port in ports:
            self.health.setdefault(port.name, PortHealth())
        self._solo = [(i, p) for i, p in enumerate(ports) if p.port_bank is None]
        self._solo_rows = np.array([i for i, _ in self._solo], np.int64)
        members: dict[int, tuple[PortBank, list[int], list[Port]]] = {}
        for i, port in enumerate(ports):
            if port.port_bank is not None:
                entry = members.setdefault(id(port.port_bank), (port.port_bank, [], []))
                entry[1].append(i)
                entry[2].append(port)
        self._banks = [
            (bank, np.array(rows, np.int64), group) for bank, rows, group in members.values()
        ]

    @staticmethod
    def _carry(
        old: np.ndarray | None, keep: np.ndarray, dtype: type, fill: float = 0
    ) -> np.ndarray:
        new = np.full(len(keep), fill, dtype)
        if old is not None and old.size:
            has_old = keep >= 0
            new[has_old] = old[keep[has_old]]
        return new

    # --- the tick -------------------------------------------------------------

    def tick(self, due: float | None = None) -> None:
        """One frame through every port; ``due`` is the tick's deadline on the media clock
        (``time.monotonic()``; now, when ticked without one)."""
        started = time.perf_counter()
        due = time.monotonic() if due is None else due
        self._run_hooks(self.before_tick)
        isolated = self._expire_isolation(self.tick_count)
        heard = self._read_ports(isolated)
        if heard is None and self._at_rest():
            self._quiet_tick(due, isolated)
        else:
            n = len(self.ports)
            has_frame, raw_talk = heard or (np.zeros(n, bool), np.zeros(n, bool))
            self._full_tick(due, has_frame, raw_talk, isolated)
        self._run_hooks(self.after_tick)
        self.tick_count += 1
        self.last_tick_seconds = time.perf_counter() - started

    def _read_ports(self, isolated: Mapping) -> tuple[np.ndarray, np.ndarray] | None:
        """Every port's frame into its row of ``frames`` (silence where it has none), and
        per port whether it handed a frame and whether it may talk and says it does; None
        when no port handed a frame or talks (most ticks of a site), which needs no array."""
        frames = self.frames  # all silence: nothing was read into it since the last full tick
        solo = len(self._solo)
        talk, got = [False] * solo, [False] * solo
        for k, (i, port) in enumerate(self._solo):
            if isolated and port.name in isolated:
                continue
            try:
                frame = port.read()
                talk[k] = port.talking
                if frame is not None:
                    frames[i] = frame
                    got[k] = True
            except Exception as exc:  # one port's bug must not stop the site
                self._fault(i, f"read failed: {exc!r}")
                talk[k] = got[k] = False
                frames[i] = 0.0
        if not (self._banks or any(talk) or any(got)):
            return None
        n = len(self.ports)
        has_frame, raw_talk = np.zeros(n, bool), np.zeros(n, bool)
        has_frame[self._solo_rows] = got
        raw_talk[self._solo_rows] = talk
        if self._banks:
            self._read_banks(frames, has_frame, raw_talk, isolated)
        self._check_frames(has_frame, raw_talk)
        raw_talk &= self.layout.can_talk
        return has_frame, raw_talk

    def _at_rest(self) -> bool:
        """Nothing carries over from the ticks before: nobody talked last tick (so nobody
        is admitted, timed out or holds a floor), no transmitter is keyed (its hang time
        is over), no tone is playing, and no link has a shared floor to decide."""
        return (
            self.layout.link is None
            and not self.group_tones
            and not self.port_tones
            and self.floor.at_rest
            and self.keying.at_rest
        )

    def _quiet_tick(self, due: float, isolated: Mapping) -> None:
        """Nothing heard, nothing carried over (:meth:`_at_rest`): the floor would admit
        nobody, the mix give nobody anything and the keying leave every transmitter down,
        so each port is written silence without that arithmetic and without one NumPy
        call (on a machine that sleeps between ticks each costs 5-8 µs from cold caches).
        ``tests/core/test_quiet_tick.py`` holds the two paths to the same result."""
        self._write_ports(None, isolated)
        self._end_of_tick(due, isolated)
        self._quiet_meters()

    def _full_tick(
        self, due: float, has_frame: np.ndarray, raw_talk: np.ndarray, isolated: Mapping
    ) -> None:
        """Floor, mix, keying, every port's audio, meters and events."""
        lay = self.layout
        frames = self.frames
        shared = lay.shared
        decision = self.floor.update(
            raw_talk,
            self.keying.keyed,
            lay.half,
            lay.group_of,
            lay.single if shared is None else lay.single & ~shared,
            lay.priority,
            lay.kerchunk_ticks,
            lay.tot_ticks,
        )
        link = lay.link
        if link is not None and self.shared_floors is not None:
            self.shared_floors.decide(self, decision)
            link = self.shared_floors.link_mask(lay)
        weights = np.where(decision.admitted, lay.rx_gain, np.float32(0.0)).astype(np.float32)
        mix = self.mixer.mix(frames, weights, lay.group_of, len(lay.groups), lay.tx_gain, link)
        receiving = lay.half & decision.talk
        # A full-duplex port asking for a floor it cannot have hears the busy tone instead.
        busy = decision.denied & ~lay.half & lay.can_transmit
        if busy.any():
            busy &= ~self._emergency_groups(decision.admitted, busy)
        if lay.link is not None:  # the far side plays its own busy tone, not ours
            busy &= ~lay.link
        busy_frame = self.busy.read(self.frame_samples) if busy.any() else None
        has_audio = (mix.audible & lay.can_transmit & ~receiving) | busy
        if self.group_tones or self.port_tones:
            self._add_tones(mix.out, has_audio, lay.can_transmit & ~receiving & ~busy)
        was_keyed = self.keying.keyed
        keyed = self.keying.update(has_audio, ~lay.can_transmit | receiving, lay.hang_ticks)
        self._apply_keying(was_keyed, keyed)
        self.denied = decision.denied

        rows = list(mix.out)  # row views made in one C loop, not one index per port
        audio_list, busy_list = has_audio.tolist(), busy.tolist()
        sends = [
            busy_frame if busy_list[i] else rows[i] if audio_list[i] else None
            for i, _ in self._solo
        ]
        self._write_ports(sends, isolated)
        self._end_of_tick(due, isolated)
        if self._banks:
            self._write_banks(mix.out, has_audio, busy, busy_frame, isolated)

        self._meter(frames, has_frame, mix.out, has_audio & ~busy)  # out rows hold mixes only
        frames.fill(0.0)  # silence where the next tick's ports hand no frame
        self._talk_events(decision.admitted)
        if decision.events:
            self._floor_events(decision.events)

    def _write_ports(self, sends: list[np.ndarray | None] | None, isolated: Mapping) -> None:
        """Each solo port's frame, in ``_solo`` order (None: silence for every one)."""
        for k, (i, port) in enumerate(self._solo):
            if isolated and port.name in isolated:
                continue
            try:
                port.write(sends[k] if sends else None)
            except Exception as exc:
                self._fault(i, f"write failed: {exc!r}")

    def _end_of_tick(self, due: float, isolated: Mapping) -> None:
        for i, port in self._solo:
            if isolated and port.name in isolated:
                continue
            try:
                port.end_of_tick(due)
            except Exception as exc:
                self._fault(i, f"end of tick failed: {exc!r}")

    def _read_banks(
        self, frames: np.ndarray, has_frame: np.ndarray, talk: np.ndarray, isolated: Mapping
    ) -> None:
        for bank, rows, members in self._banks:
            try:
                has, talking = bank.read_frames(members, frames, rows)
                has_frame[rows] = has
                talk[rows] = talking
            except Exception as exc:  # the bank's bug isolates its ports, not the site
                for i in rows.tolist():
                    self._fault(i, f"bank read failed: {exc!r}")
                frames[rows] = 0.0
            if isolated:
                for k, port in enumerate(members):
                    if port.name in isolated:
                        frames[rows[k]] = 0.0
                        has_frame[rows[k]] = talk[rows[k]] = False

    def _write_banks(
        self,
        out: np.ndarray,
        has_audio: np.ndarray,
        busy: np.ndarray,
        busy_frame: np.ndarray | None,
        isolated: Mapping,
    ) -> None:
        for bank, rows, members in self._banks:
            audible = has_audio[rows]
            if busy_frame is not None:
                denied = rows[busy[rows]]
                out[denied] = busy_frame  # those rows carry no mix (the meter skips them)
            if isolated:
                audible &= np.array([p.name not in isolated for p in members], bool)
            try:
                bank.write_frames(members, out, rows, audible)
            except Exception as exc:
                for i in rows.tolist():
                    self._fault(i, f"bank write failed: {exc!r}")

    def _emergency_groups(self, admitted: np.ndarray, busy: np.ndarray) -> np.ndarray:
        """Per port: True when an emergency caller is heard in its mix group.

        An emergency caller is a port in :attr:`emergency` (a console's or a phone's
        emergency call) or one whose ``emergency`` says so: a radio's emergency button,
        or a link leg carrying the far side's emergency (the links' shared floor admits
        it). Only the talkers heard in groups where someone would get the busy tone are
        looked at."""
        lay = self.layout
        heard = np.flatnonzero(admitted & np.isin(lay.group_of, lay.group_of[busy]))
        calling = [
            int(lay.group_of[i])
            for i in heard.tolist()
            if lay.ports[i].name in self.emergency or getattr(lay.ports[i], "emergency", False)
        ]
        return np.isin(lay.group_of, calling)

    def _add_tones(self, out: np.ndarray, has_audio: np.ndarray, may_hear: np.ndarray) -> None:
        """Courtesy and talk-permit tones, added on top of what each listener hears."""
        n = self.frame_samples
        for group, tone in list(self.group_tones.items()):
            rows = np.flatnonzero((self.layout.group_of == group) & may_hear)
            self._add_tone(out, has_audio, rows, tone.read(n))
            if tone.done:
                del self.group_tones[group]
        for port, tone in list(self.port_tones.items()):
            if may_hear[port]:
                self._add_tone(out, has_audio, np.array([port]), tone.read(n))
            if tone.done or not may_hear[port]:
                del self.port_tones[port]

    @staticmethod
    def _add_tone(
        out: np.ndarray, has_audio: np.ndarray, rows: np.ndarray, tone: np.ndarray
    ) -> None:
        silent = rows[~has_audio[rows]]
        out[silent] = 0.0  # rows nobody mixed into this tick hold stale audio
        out[rows] = np.clip(out[rows] + tone, -1.0, 1.0)
        has_audio[rows] = True

    @staticmethod
    def _run_hooks(hooks: list[Callable[[], None]]) -> None:
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("tick hook %r failed", hook)

    def _expire_isolation(self, tick: int) -> dict[str, int]:
        """Ports whose retry time has come are read again (retry after backoff)."""
        if self.isolated:
            for name in [n for n, until in self.isolated.items() if until <= tick]:
                del self.isolated[name]
        return self.isolated

    def _check_frames(self, has_frame: np.ndarray, raw_talk: np.ndarray) -> None:
        rows = np.flatnonzero(has_frame)
        if rows.size == 0:
            return
        block = self.frames if rows.size == len(self.frames) else self.frames[rows]
        # max of |x| is NaN for a row holding NaN, and NaN > 1 is False: test finiteness first.
        peak = np.maximum(block.max(axis=1), -block.min(axis=1))
        broken = ~np.isfinite(peak) | (peak > OUT_OF_RANGE)
        for i in rows[broken].tolist():
            self.health[self.ports[i].name].bad_frames += 1
            self._fault(i, "frame has NaN/Inf or is far out of range (|x| > 2)")
            self.frames[i] = 0.0
            raw_talk[i] = False
            has_frame[i] = False
        hot = rows[(peak > 1.0) & ~broken]  # a little over full scale: clip, keep the port
        if hot.size:
            self.frames[hot] = np.clip(self.frames[hot], -1.0, 1.0)

    def _apply_keying(self, was: np.ndarray, now: np.ndarray) -> None:
        for i in np.flatnonzero(was != now).tolist():
            port = self.ports[i]
            on = bool(now[i])
            try:
                port.key(on)
            except Exception as exc:
                self._fault(i, f"PTT {'key' if on else 'unkey'} failed: {exc!r}")
                continue
            if on:
                self.key_since[i] = self.tick_count
                self._emit(Event("ptt_on", port.name, self._group_name(i), tick=self.tick_count))
            else:
                held = (self.tick_count - self.key_since[i]) * self.frame_seconds
                self._emit(
                    Event(
                        "ptt_off",
                        port.name,
                        self._group_name(i),
                        seconds=held,
                        tick=self.tick_count,
                    )
                )

    def _unkey(self, i: int) -> None:
        """Drop a PTT outside the tick's keying (stop, a fault, a call leaving): the
        ``ptt_off`` is reported as the tick's would be, so every key-up the audit log
        holds has its release and length."""
        was_keyed = bool(self.keying.keyed[i])
        self.keying.keyed[i] = False
        try:
            self.ports[i].key(False)
        except Exception:
            log.exception("port %s: unkey failed", self.ports[i].name)
        if was_keyed:
            held = (self.tick_count - self.key_since[i]) * self.frame_seconds
            self._emit(
                Event(
                    "ptt_off",
                    self.ports[i].name,
                    self._group_name(i),
                    seconds=held,
                    tick=self.tick_count,
                )
            )

    def _fault(self, i: int, reason: str) -> None:
        port = self.ports[i]
        health = self.health[port.name]
        since_last = self.tick_count - health.down_until_tick
        health.consecutive = 1 if since_last * self.frame_seconds > 60 else health.consecutive + 1
        backoff = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (health.consecutive - 1))
        health.faults += 1
        health.last_fault = reason
        health.down_until_tick = self.tick_count + max(1, round(backoff / self.frame_seconds))
        self.isolated[port.name] = health.down_until_tick
        log.warning("port %s isolated for %.0fs: %s", port.name, backoff, reason)
        if self.keying.keyed[i]:
            self._unkey(i)
        self._emit(
            Event("fault", port.name, self._group_name(i), detail=reason, tick=self.tick_count)
        )

    def _meter(
        self, frames: np.ndarray, has_frame: np.ndarray, out: np.ndarray, tx: np.ndarray
    ) -> None:
        """Level meters (RMS dBFS per frame) that fall back at METER_FALL_DB_PER_S.

        Like a radio's level meter, a word stays visible for a moment, so a display
        refreshed a few times a second or a scrape every 15 s sees speech, not the
        pause between two syllables.
        """
        self._meter_fall()
        for rows, source, meter in (
            (np.flatnonzero(has_frame), frames, self.rx_dbfs),
            (np.flatnonzero(tx), out, self.tx_dbfs),
        ):
            if rows.size == 0:
                continue
            # Energy per row without temporaries; skip the gather when most rows count.
            if rows.size * 4 > len(source):
                energy = np.einsum("ij,ij->i", source, source)[rows]
            else:
                block = source[rows]
                energy = np.einsum("ij,ij->i", block, block)
            level = 10 * np.log10(np.maximum(energy / source.shape[1], 1e-12))
            meter[rows] = np.maximum(meter[rows], level)
            self._meters_down = False

    def _meter_fall(self) -> None:
        """Every meter falls METER_FALL_DB_PER_S, down to SILENCE_DB."""
        fall = METER_FALL_DB_PER_S * self.frame_seconds
        for meter in (self.rx_dbfs, self.tx_dbfs):
            np.maximum(meter - fall, SILENCE_DB, out=meter)

    def _quiet_meters(self) -> None:
        """A quiet tick's meters: they fall until every one is at SILENCE_DB, after which
        quiet ticks leave them alone (until a full tick meters a level)."""
        if not self._meters_down:
            self._meter_fall()
            self._meters_down = bool(max(self.rx_dbfs.max(), self.tx_dbfs.max()) <= SILENCE_DB)

    def _talk_events(self, admitted: np.ndarray) -> None:
        changed = np.flatnonzero(admitted != self.admitted)
        for i in changed.tolist():
            name, group = self.ports[i].name, self._group_name(i)
            g = int(self.layout.group_of[i])
            if admitted[i]:
                self.talk_since[i] = self.tick_count
                if self.layout.talk_permit[i] and not self.layout.half[i]:
                    self.port_tones[i] = talk_permit_tone(self.rate)
                self._emit(
                    Event("talk_start", name, group, tick=self.tick_count, talker=self.talker_of(i))
                )
            else:
                held = (self.tick_count - self.talk_since[i]) * self.frame_seconds
                others = admitted & (self.layout.group_of == g)
                if g < len(self.layout.groups) and self.layout.courtesy[g] and not others.any():
                    self.group_tones[g] = courtesy_tone(self.rate)
                self._emit(
                    Event(
                        "talk_stop",
                        name,
                        group,
                        seconds=held,
                        tick=self.tick_count,
                        talker=self.talker_of(i),
                    )
                )
        self.admitted = admitted

    def _floor_events(self, events: FloorEvents) -> None:
        groups = self.layout.groups
        for group, port in events.granted:
            self._emit(
                Event(
                    "floor_granted", self.ports[port].name, groups[group].name, tick=self.tick_count
                )
            )
        for group, old, new in events.preempted:
            by = f"by {self.ports[new].name}"
            self._emit(
                Event(
                    "preempted", self.ports[old].name, groups[group].name, by, tick=self.tick_count
                )
            )
        for port in events.tot_trips:
            self._emit(
                Event("tot", self.ports[port].name, self._group_name(port), tick=self.tick_count)
            )

    def talker_of(self, i: int) -> str:
        """Who talks through port ``i`` when its endpoint knows (a link leg's far-side
        talker), else ""."""
        return getattr(self.ports[i], "talker", "") or ""

    def _group_name(self, i: int) -> str | None:
        g = int(self.layout.group_of[i])
        return self.layout.groups[g].name if g < len(self.layout.groups) else None

    def emit(self, event: Event) -> None:
        """Tell every listener (log, audit, MQTT, metrics) of something outside the tick:
        a port that could not start, a patch a reload turned on."""
        self._emit(event)

    def _emit(self, event: Event) -> None:
        if event.port is not None and not event.label:
            label = self._labels.get(event.port, "")
            if label and label != event.port:
                event = replace(event, label=label)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", event)

    # --- shutdown -------------------------------------------------------------

    def unkey_all(self) -> None:
        """Drop every PTT now; used on stop and on fatal errors."""
        for i in range(len(self.ports)):
            self._unkey(i)
