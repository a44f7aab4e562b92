"""One link leg's talker extension, both ways: what this side says, and what the peer said.

Both ends of a link dialog agree the extension in SDP (``a=extmap:1
urn:borderlink:talker site=SITE_ID``, see :func:`offer` and :func:`agreed`): its
ID, and each side's site ID, which the shared floor needs for its last tie-break.
A peer whose SDP does not name it (plain BSI-Core 1.1) gets no extension and is
keyed by voice activity.

Receive: the leg bank hands over the peer's block when it changes
(``LegMedia.on_extension``; the same words on every packet of an over cost no
Python here), a :class:`~gateway.links.talker.Listener` reads it, and the peer's
keyed state goes to the bank's ``peer_keyed`` column, which keys the leg like PTT
(voice activity only plays out the last :data:`TAIL` of an over still in the
jitter buffer). A block we will not believe
(malformed, or a label where none belongs) changes nothing and is counted by its
reason (``borderlink_link_talker_rejected_total``). A peer that stops sending is
no longer believed keyed after :data:`STALE`, long before the keepalive ends the
dialog: no stuck talker across the border. A shared floor keeps its talker a little
longer (:data:`FLOOR_HOLD`, :meth:`OnAir.report`): a sender stalled for a moment (a
busy machine skipping ticks) must not make this side hand the floor to someone else
while every other side still gives it to that talker.

Send: the arbiter (:mod:`gateway.links.arbiter`) tells each leg once a tick who
of this side it carries; an :class:`~gateway.links.talker.Announcer` numbers the
overs, and the block changes in the bank only when the words do. The label of
each new over goes once to the peer in the dialog (``tell``, set by the trunk:
:mod:`gateway.links.labels`), never in the RTP; the peer's labels come back the
same way (:meth:`OnAir.named`) and name its overs by talker ID and key-up time.

Each over heard from the peer is audited when it ends (``link_talker``: talker
ID, label, priority, emergency, key-up and length), so each side keeps its own
record of who spoke to it from across the border.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from gateway.links.floor import Candidate
from gateway.links.labels import Named
from gateway.links.talker import (
    URI,
    Announcer,
    Listener,
    Reason,
    Rejected,
    Talker,
    encode,
    unwrap_ms,
)
from gateway.links.topology import Topology

if TYPE_CHECKING:
    from gateway.sip.bank import LegBank
    from gateway.sip.sdp import MediaOffer

STALE = 0.3  # seconds without a packet from the peer: its talker is no longer keyed
FLOOR_HOLD = 1.0  # seconds without a packet: its talker no longer holds a shared floor
TAIL = 0.1  # after the peer unkeys, its voice still in the jitter buffer keeps the leg talking
NAMES_KEPT = 8  # the peer's latest over labels: the current over's, and a few it sent ahead
EXTENSION_ID = 1  # the ID we offer (an answer takes the offer's)
_SITE = re.compile(r"(?:^|\s)site=([A-Za-z0-9][A-Za-z0-9_.-]{0,31})(?:\s|$)")


def offer(site_id: str, ext_id: int = EXTENSION_ID) -> tuple[int, str]:
    """Our ``a=extmap`` (ID, "URI site=ID"): the talker extension, and who we are."""
    return ext_id, f"{URI} site={site_id}"


def agreed(media: MediaOffer | None, site_id: str) -> tuple[int, str] | None:
    """(extension ID, the peer's site ID) when the peer's SDP names the talker extension
    with a usable site ID other than ours; None: no extension on this dialog."""
    found = media.extension(URI) if media is not None else None
    if found is None:
        return None
    ext_id, attributes = found
    site = _SITE.search(attributes)
    if site is None or site.group(1) == site_id:
        return None
    return ext_id, site.group(1)


class OnAir:
    """The talker extension of one link leg (a row of the leg bank)."""

    def __init__(
        self,
        bank: LegBank,
        row: int,
        ext_id: int,
        rejected: collections.Counter[Reason],
        audit: Callable[..., None],
        **where: str,
    ) -> None:
        self.bank = bank
        self.row = row
        self.ext_id = ext_id
        self.rejected = rejected  # the trunk's counts by reason (metrics)
        self.audit = audit
        self.where = where  # link and share: for the audit
        self.announcer = Announcer()
        self.listener = Listener(ext_id)
        self.heard: Talker | None = None  # the peer's latest words
        self.names: collections.OrderedDict[tuple[int, int], Named] = collections.OrderedDict()
        self.keyed_sent = False
        self.tell: Callable[[Named], bool] | None = None  # our label to the peer (the trunk)
        # How each side links in this talkgroup (gateway.links.topology), in the dialog:
        self.tell_topology: Callable[[Topology], bool] | None = None  # set by the trunk
        self.peer_topology: Topology | None = None  # what the peer said (None: nothing yet)
        self.topology: Topology | None = None  # what we say; sent when it changes
        self._topology_told: Topology | None = None
        self._gap: Talker | None = None  # the peer's talker when its packets stopped
        self._sent: Talker | None = None
        self._told: tuple[int, int, str] = (0, 0, "")  # the over (and label) the peer was told
        self._over_began = 0.0  # wall time the peer's current over was first heard
        media = bank.table.media[row]
        assert media is not None
        media.on_extension = self.on_extension
        bank.extensions.hear_extensions(row)
        bank.table.vox_hang[row] = max(1, round(TAIL / bank.frame_seconds))  # keyed by its words
        self.say(Talker(keyed=False))

    # --- what the peer says --------------------------------------------------------------

    def on_extension(self, block: bytes) -> None:
        result = self.listener.read(block)
        if isinstance(result, Rejected):
            self.rejected[result.reason] += 1
            self.bank.extensions.forget(self.row)  # counted on every packet that carries it
            return
        self._gap = None
        self._hear(result)

    def _hear(self, talker: Talker) -> None:
        old = self.heard
        same_over = old is not None and (old.talker_id, old.keyed_at) == (
            talker.talker_id,
            talker.keyed_at,
        )
        if old is not None and old.keyed and (not talker.keyed or not same_over):
            self._over_ended(old)
        if talker.keyed and not (same_over and old is not None and old.keyed):
            self._over_began = time.time()
        self.heard = talker
        self.bank.table.peer_keyed[self.row] = talker.keyed

    def _over_ended(self, talker: Talker) -> None:
        now = time.time()
        self.audit(
            "link_talker",
            **self.where,
            talker_id=talker.talker_id,
            label=self._name(talker),
            priority=talker.priority,
            emergency=talker.emergency,
            keyed_at_ms=unwrap_ms(talker.keyed_at, int(now * 1000)),
            seconds=round(now - self._over_began, 3),
        )

    def check_stale(self, now: float) -> None:
        """The peer fell silent while keyed: it is unkeyed here (called once a tick)."""
        heard = self.heard
        if (
            heard is not None
            and heard.keyed
            and now - float(self.bank.table.rtp_at[self.row]) > STALE
        ):
            self._gap = heard
            self._hear(replace(heard, keyed=False))
            self.bank.extensions.forget(self.row)  # its next packet, the same words, re-keys it

    def close(self) -> None:
        """The dialog ended: an over still keyed ends with it (audited)."""
        if self.heard is not None and self.heard.keyed:
            self._over_ended(self.heard)
            self.heard = replace(self.heard, keyed=False)

    def named(self, named: Named) -> None:
        """The peer's label for one of its overs (it may come before the over's packets).
        The oldest go first, but never the label of the over on the air."""
        self.names[(named.talker_id, named.keyed_at)] = named
        self.names.move_to_end((named.talker_id, named.keyed_at))
        heard = self.heard
        on_air = (heard.talker_id, heard.keyed_at) if heard is not None else None
        while len(self.names) > NAMES_KEPT:
            oldest = next(iter(self.names))
            if oldest == on_air:
                self.names.move_to_end(oldest)
            else:
                del self.names[oldest]

    def _name(self, talker: Talker) -> str:
        named = self.names.get((talker.talker_id, talker.keyed_at))
        return named.label if named is not None else ""

    def origin(self, talker: Talker) -> str:
        """The site of the peer's talker when the peer relays it from another ("": its own)."""
        named = self.names.get((talker.talker_id, talker.keyed_at))
        return named.site if named is not None else ""

    @property
    def label(self) -> str:
        """The label of the peer's latest over; "" until the peer named it."""
        return self._name(self.heard) if self.heard is not None else ""

    def report(self, site: str, now_ms: int) -> Candidate | None:
        """The peer's best candidate for a shared floor (None: nobody keyed there).

        What the peer said last: a talker whose packets stopped (:data:`STALE`: no
        longer keyed, so no longer heard here) still holds the floor until
        :data:`FLOOR_HOLD` after its last packet, or the peer says otherwise, or the
        dialog ends (the keepalive ends a dead one within 1.7 s)."""
        heard = self.heard
        if heard is None:
            return None
        if self._gap is not None and not heard.keyed:
            if now_ms / 1000 - float(self.bank.table.rtp_at[self.row]) <= FLOOR_HOLD:
                heard = self._gap
            else:
                self._gap = None
        return Candidate.from_talker(self.origin(heard) or site, heard, now_ms)

    # --- what we say ------------------------------------------------------------------------

    def announce(
        self,
        now_ms: int,
        candidate: Candidate | None = None,
        label: str = "",
        squelch: bool = False,
        origin: str = "",
    ) -> None:
        """Who of this side the leg carries now (None: nobody asks here). ``origin``: the
        site of a talker this side relays from another link (its talker ID passes on)."""
        if candidate is None:
            if not self.keyed_sent:
                return
            talker = self.announcer.stamp(False, now_ms)
        else:
            talker = self.announcer.stamp(
                True,
                now_ms,
                label,
                candidate.priority,
                candidate.emergency,
                squelch,
                keyed_at=candidate.keyed_at_ms,
                talker_id=candidate.talker if origin else None,
            )
        self.keyed_sent = talker.keyed
        over = (talker.talker_id, talker.keyed_at, self.announcer.label)
        if talker.keyed and over != self._told and self.tell is not None:
            named = Named(talker.talker_id, talker.keyed_at, self.announcer.label, origin)
            if not named.label or self.tell(named):  # else: again next tick
                self._told = over
        self.say(talker)

    def heard_topology(self, said: Topology) -> None:
        """The peer said how it links; a peer that relays is told how we do (it needs it)."""
        self.peer_topology = said
        if said.relay:
            self.say_topology()

    def say_topology(self) -> bool:
        """Tell the peer how this side links (:attr:`topology`) if it changed; False: the
        dialog cannot carry it yet (try again next tick)."""
        if self.topology is None or self.topology == self._topology_told:
            return True
        if self.tell_topology is None or not self.tell_topology(self.topology):
            return False
        self._topology_told = self.topology
        return True

    def say(self, talker: Talker) -> None:
        """Our words on the leg's next packets. While nobody is keyed the leg may rest
        (an Opus leg sends its silence as DTX, :mod:`gateway.sip.bank_opus`); a keyed
        talker's packets never pause, or the peer would take the talker as gone (STALE)."""
        if talker != self._sent:
            self._sent = talker
            self.bank.extensions.set_extension(self.row, encode(talker, self.ext_id))
            self.bank.opus_edges.may_rest(self.row, not talker.keyed)
