"""Relaying between links without loops: what each side says of its links, and the rule.

A site configured to **relay** a talkgroup (``[links] relay``) lets each of its links
in that talkgroup hear the others (ordinary N-1) instead of only its own side, so a
chain A–B–C hears itself end to end. Relaying is safe only where it is the one path
between two sites: in a triangle A–B–C with A–C linked too, B forwarding A to C would
make C hear A twice and A hear itself back. So each side tells each peer, per shared
name, in the link dialog over its TLS (an INFO, like the talker labels)::

    INFO sip:… SIP/2.0
    Content-Type: application/borderlink-topology

    relay=1
    onward=1
    links=ca-bc,us-wa

It is said only where a relay needs it: a relaying side says it to each peer, and a
side says it to each peer that said it relays (two sides that relay nothing exchange
nothing new). ``relay``: this side relays the talkgroup behind that shared name; ``links``: the site
IDs of its other peers in that talkgroup (direct links); ``onward=0``: this side
refuses that what it sends on this share be passed on to any other site (its
``share`` entry's ``onward = false``).

The rule (:func:`held_back`), on the relaying side, per talkgroup: relay only while
every peer in it has spoken, none relays too, none refuses onward, and none links
directly to another of them. Otherwise the talkgroup carries only each side's own
audio (as without ``relay``), and the reason is logged, audited and a metric.
Everything received is hostile: :func:`read` returns a :class:`Rejected` and never
raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.links.labels import SITE, info_fields
from gateway.links.talker import Rejected

CONTENT_TYPE = "application/borderlink-topology"
MAX_BODY = 512
FIELDS = (b"relay", b"onward", b"links")
MAX_LINKS = 16  # peers named in one message


@dataclass(frozen=True, slots=True)
class Topology:
    """What one side says of the talkgroup behind one shared name."""

    relay: bool = False
    onward: bool = True
    links: frozenset[str] = frozenset()  # its other peers' site IDs in that talkgroup


def body(topology: Topology) -> str:
    return (
        f"relay={int(topology.relay)}\r\nonward={int(topology.onward)}\r\n"
        f"links={','.join(sorted(topology.links))}\r\n"
    )


def read(content_type: str, data: bytes) -> Topology | Rejected:
    """The topology an INFO body names; a body that is not exactly ours is ``info``."""
    fields = info_fields(content_type, data, CONTENT_TYPE, MAX_BODY, FIELDS)
    if fields is None:
        return Rejected("info")
    relay, onward = fields.get(b"relay"), fields.get(b"onward", b"1")
    if relay not in (b"0", b"1") or onward not in (b"0", b"1"):
        return Rejected("info")
    sites = [s for s in fields.get(b"links", b"").split(b",") if s]
    if len(sites) > MAX_LINKS or not all(SITE.match(s) for s in sites):
        return Rejected("info")
    return Topology(relay == b"1", onward == b"1", frozenset(s.decode() for s in sites))


def held_back(peers: Mapping[str, Topology | None]) -> str:
    """Why a relay must not forward between these peers now ("" : it may).

    ``peers``: each peer site in the talkgroup → what it said (None: nothing yet)."""
    if len(peers) < 2:
        return ""  # nothing to forward between: not held back, just idle
    for peer, said in sorted(peers.items()):
        if said is None:
            return f"{peer} has not said how it links"
        if said.relay:
            return f"{peer} relays too (a relay never forwards to another relay)"
        if not said.onward:
            return f"{peer} refuses that its audio go onward"
        direct = sorted(said.links & (peers.keys() - {peer}))
        if direct:
            return f"{peer} links to {direct[0]} directly"
    return ""
