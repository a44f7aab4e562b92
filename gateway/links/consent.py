"""Mutual consent: a shared talkgroup carries audio only while both sides share it.

Each side decides alone what it offers on a link: local talkgroups under *shared
names*, each ``both``, ``send`` or ``receive`` (from that side's point of view).
Audio crosses for a shared name only where the two offers meet: our ``send``
meets the peer's ``receive`` or ``both``, and so on. Neither side can make the
other share more, and withdrawing a name (a cut) stops it at once, whatever the
peer says.

Privacy is a property of the types. :class:`Shares` is this side's own list and
the only thing that knows local talkgroup names; what goes on the wire is an
:class:`Offer` (shared names and directions, nothing else), and the only offers
this side can build come from its ``Shares`` — so what it sends never names a
talkgroup it does not share, and never echoes a name the peer offered that it does
not share itself. A peer asking for a name we do not share gets the same answer
whether a talkgroup of that name exists here or not (:meth:`Shares.answer`).

The trunk carries one SIP dialog per shared name, so the per-name exchange maps
onto SDP's direction attribute (RFC 3264): ``both`` ↔ ``sendrecv``, ``send`` ↔
``sendonly``, ``receive`` ↔ ``recvonly``. :meth:`Offer.encode` is the compact
list form (``marine=both,fishery=send``) for a keepalive or a status page.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

Direction = Literal["both", "send", "receive"]
DIRECTIONS: tuple[Direction, ...] = get_args(Direction)

SHARED_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
"""A shared name: what the other side (and a BSI-Core bridge dialling it) sees.
Lower case, digits, ``_ . -``; safe in a SIP URI user part, an MQTT topic and a
metrics label."""

MAX_NAMES = 256  # shared names on one link; a longer offer from a peer is cut here
MAX_OFFER_TEXT = 16 * 1024

Reason = Literal["malformed", "bad_name", "bad_direction", "duplicate", "too_many", "not_shared"]
"""Why (part of) a peer's offer was refused; a fixed set so each can be counted."""

_SDP = {"both": "sendrecv", "send": "sendonly", "receive": "recvonly"}
_FROM_SDP = {sdp: direction for direction, sdp in _SDP.items()}


def to_sdp(direction: Direction) -> str:
    """The SDP attribute (without ``a=``) that says ``direction`` from the writer's side."""
    return _SDP[direction]


def from_sdp(attribute: str) -> Direction | None:
    """The writer's direction from its SDP attribute; None for ``inactive`` or garbage."""
    return _FROM_SDP.get(attribute.strip().lower())


def meet(mine: Direction, theirs: Direction) -> tuple[bool, bool]:
    """(we send, we receive) where our direction meets the peer's for one shared name."""
    send = mine in ("send", "both") and theirs in ("receive", "both")
    receive = mine in ("receive", "both") and theirs in ("send", "both")
    return send, receive


@dataclass(frozen=True, slots=True)
class Offer:
    """Shared names and their directions, as one side states them on the wire.

    Build ours with :meth:`Shares.offer` or :meth:`Consent.answer`; read the peer's
    with :meth:`decode`. It holds nothing but shared names and directions.
    """

    names: Mapping[str, Direction] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", MappingProxyType(dict(self.names)))

    def encode(self) -> str:
        return ",".join(f"{name}={direction}" for name, direction in sorted(self.names.items()))

    @staticmethod
    def decode(text: str) -> tuple[Offer, list[Reason]]:
        """The peer's offer, and one reason per entry dropped from it.

        Bad entries are dropped one by one (a typo on the far side does not take the
        other shares down); a name given twice is dropped entirely, since we cannot
        know which direction was meant. Never raises.
        """
        if not isinstance(text, str) or len(text) > MAX_OFFER_TEXT:
            return Offer(), ["malformed"]
        names: dict[str, Direction] = {}
        twice: set[str] = set()
        reasons: list[Reason] = []
        entries = [entry for entry in text.split(",") if entry.strip()]
        if len(entries) > MAX_NAMES:
            reasons.append("too_many")
            entries = entries[:MAX_NAMES]
        for entry in entries:
            name, sep, direction = (part.strip() for part in entry.partition("="))
            if not sep:
                reasons.append("malformed")
            elif not SHARED_NAME.match(name):
                reasons.append("bad_name")
            elif direction not in DIRECTIONS:
                reasons.append("bad_direction")
            elif name in names or name in twice:
                reasons.append("duplicate")
                names.pop(name, None)
                twice.add(name)
            else:
                names[name] = direction  # type: ignore[assignment]  (checked just above)
        return Offer(names), reasons


@dataclass(frozen=True, slots=True)
class Flow:
    """One shared name that carries audio, as agreed, seen from this side."""

    name: str  # the shared name (on the wire)
    talkgroup: str  # our local talkgroup (never on the wire)
    send: bool  # our talkgroup's audio goes to the peer
    receive: bool  # the peer's audio comes into our talkgroup

    @property
    def direction(self) -> Direction:
        return "both" if self.send and self.receive else "send" if self.send else "receive"

    @property
    def sdp(self) -> str:
        """Our SDP direction attribute for this flow's dialog."""
        return to_sdp(self.direction)


@dataclass(frozen=True, slots=True)
class Refused:
    """A peer asked for a name that carries nothing; ``reason`` is for a counter."""

    reason: Reason


@dataclass(frozen=True, slots=True)
class Consent:
    """What crosses a link now: the shared names both sides offer, with directions.

    ``unmet`` are names both sides share whose directions do not meet (both say
    ``send``): nothing flows, and each side already knows the name, so they can be
    shown to an operator on either side as a misconfiguration.
    """

    flows: Mapping[str, Flow]
    unmet: frozenset[str] = frozenset()

    def answer(self) -> Offer:
        """Our agreed directions for the names that flow: what we confirm to the peer."""
        return Offer({name: flow.direction for name, flow in self.flows.items()})

    def for_talkgroup(self, talkgroup: str) -> list[Flow]:
        return [flow for flow in self.flows.values() if flow.talkgroup == talkgroup]


class Shares:
    """What this side offers on one link: shared name → (local talkgroup, direction).

    Immutable: a cut or a reload builds a new one (:meth:`without`), so a decision
    already taken never changes under the caller's feet.
    """

    def __init__(self, entries: Mapping[str, tuple[str, Direction]] | None = None) -> None:
        entries = dict(entries or {})
        for name, (_, direction) in entries.items():
            if not SHARED_NAME.match(name):
                raise ValueError(f"{name!r} is not a shared name (a-z, 0-9, '_', '.', '-')")
            if direction not in DIRECTIONS:
                raise ValueError(f"{direction!r} is not one of {', '.join(DIRECTIONS)}")
        self._entries: Mapping[str, tuple[str, Direction]] = MappingProxyType(entries)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._entries)

    def talkgroup(self, name: str) -> str | None:
        """Our local talkgroup behind a shared name; None when we do not share it."""
        entry = self._entries.get(name)
        return entry[0] if entry else None

    def entry(self, name: str) -> tuple[str, Direction] | None:
        """(local talkgroup, our direction) behind a shared name; None when not shared."""
        return self._entries.get(name)

    def without(self, names: Iterable[str]) -> Shares:
        """These shares with some names withdrawn (a sovereign cut of one talkgroup)."""
        gone = set(names)
        return Shares({n: e for n, e in self._entries.items() if n not in gone})

    def offer(self) -> Offer:
        """Everything we share, for the peer: shared names and directions only."""
        return Offer({name: direction for name, (_, direction) in self._entries.items()})

    def agree(self, theirs: Offer) -> Consent:
        """The flows where our shares meet the peer's offer; only names we share."""
        flows: dict[str, Flow] = {}
        unmet: set[str] = set()
        for name, (talkgroup, mine) in self._entries.items():
            if name not in theirs.names:
                continue
            send, receive = meet(mine, theirs.names[name])
            if send or receive:
                flows[name] = Flow(name, talkgroup, send, receive)
            else:
                unmet.add(name)
        return Consent(MappingProxyType(flows), frozenset(unmet))

    def answer(self, name: str, theirs: Direction | None) -> Flow | Refused:
        """One dialog: the peer asks for ``name`` offering ``theirs`` (from its SDP).

        Anything we do not share — a local talkgroup's own name, a name cut a moment
        ago, garbage — is refused with the same reason, so the answer says nothing
        about what exists here.
        """
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            return Refused("not_shared")
        if theirs not in DIRECTIONS:
            return Refused("bad_direction")
        talkgroup, mine = entry
        send, receive = meet(mine, theirs)
        if not (send or receive):
            return Refused("bad_direction")
        return Flow(name, talkgroup, send, receive)

    def __repr__(self) -> str:
        return f"Shares({dict(self._entries)!r})"
