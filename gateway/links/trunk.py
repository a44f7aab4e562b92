"""The trunk: one SIP dialog per agreed shared name between two gateways, kept up.

Both sides dial every name they share (``sips:NAME@peer``, From
``sips:SITE_ID@…``, G.711 µ-law, SRTP required — SDES keys over the link's TLS —
SDP direction from the share) whenever no
dialog carries it, and both answer. When two dialogs for one name meet (glare:
both dialled at once), the one **placed by the lower site ID wins** on both
sides — each side knows both IDs (ours from config, the peer's from the From of
its INVITE), so both keep the same dialog and hang up the other. Exactly one
dialog per shared name, whoever calls first, and no side depends on the other
to bring the link back.

An INVITE reaches a trunk only from a TLS peer whose certificate proved it is
this link's peer (:meth:`Trunk.recognises`). It is answered with
:meth:`Shares.answer`: a name we do not share gets 403 whether a talkgroup of
that name exists here or not.

Who talks is named in the dialog, not in the RTP: the label of each over goes to
the peer as one INFO (:mod:`gateway.links.labels`); an INFO is believed only from
this link's verified peer, within :data:`~gateway.links.labels.RATE`. A label that
comes after the engine named the over by the peer's site ID is followed by a
``talker_named`` event for that over (:meth:`Trunk._renamed`).

The dialogs are kept alive by an in-dialog OPTIONS every :data:`KEEPALIVE`
seconds; no answer within :data:`KEEPALIVE_TIMEOUT` ends them (BYE), which detaches
each leg at once (a radio keyed across the link is unkeyed). One OPTIONS a round
answers for all the link's dialogs (they go to one peer): a hundred shared names
cost two OPTIONS a second, not two hundred, and are noticed dead just as soon.
Redials back off from :data:`BACKOFF_MIN` doubling to :data:`BACKOFF_MAX`, trying
the peer then the backup address.

**Cut**: this side ends the link (or one shared name) alone. Dialogs end now with
``Reason: SIP;cause=403;text="cut"``; the leg leaves the talkgroup in the same
call, before the next tick; the peer's redials get 403 with that Reason, so it
shows ``cut_by_peer`` and keeps backing off until this side restores.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509

from gateway.config import Timing
from gateway.engine import Engine, Event
from gateway.links import labels, topology
from gateway.links.config import LinkConfig, load_certificates
from gateway.links.consent import Flow, Refused, Shares, from_sdp, to_sdp
from gateway.links.onair import OnAir, agreed
from gateway.links.onair import offer as talker_extmap
from gateway.links.talker import Rejected
from gateway.ports import PortConfig
from gateway.sip.bank import LegBank
from gateway.sip.calls import CallManager, Dialog, uri_user
from gateway.sip.config import DialOutConfig
from gateway.sip.leg import SipLeg
from gateway.sip.message import SipMessage, Source
from gateway.sip.opus import available as opus_available
from gateway.sip.sdp import MediaOffer, read_offer

log = logging.getLogger(__name__)

KEEPALIVE = 0.5  # seconds between OPTIONS on the link (in one of its dialogs)
KEEPALIVE_TIMEOUT = 1.2  # no answer by then: the link is dead (noticed within 2 s)
LABEL_TIMEOUT = 2.0  # an INFO with a talker label unanswered by then: logged
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
STABLE = 10.0  # a dialog up this long resets the backoff
CUT_REASON = 'SIP;cause=403;text="cut"'
_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")

STATES = ("up", "down", "cut", "cut_by_peer")


class LinkLeg(SipLeg):
    """A trunk leg: a SIP leg of kind ``link`` (the mixer gives it no other link's audio),
    which talks only if the peer's audio may come in and hears only if ours may go out.

    With the talker extension agreed (``onair``) it is keyed by what the peer says and
    carries who talks here; ``talker`` is the far side's current talker label, which the
    engine's events, the console, audit and MQTT show instead of the leg's name — the
    peer's site ID until the peer has named the over (its label comes in the dialog)."""

    kind = "link"

    def __init__(
        self,
        name: str,
        config: PortConfig,
        timing: Timing,
        bank: LegBank,
        row: int,
        route: str = "",
        *,
        flow: Flow,
        peer_site: str = "",
        talker: TalkerTerms | None = None,
    ) -> None:
        super().__init__(name, config, timing, bank, row, route)
        self.flow = flow
        self.can_talk = flow.receive
        self.can_transmit = flow.send
        self.peer_site = peer_site  # the shared floor's name for the far side
        self.onair: OnAir | None = None
        self.onward = True  # this side lets a relay pass on what it sends here
        if talker is not None:
            self.peer_site = talker.peer_site
            self.onward = talker.onward
            self.onair = OnAir(
                bank,
                row,
                talker.ext_id,
                talker.rejected,
                talker.audit,
                link=talker.link,
                share=talker.share,
            )

    @property
    def talker(self) -> str:
        return (self.onair.label or self.peer_site) if self.onair is not None else ""

    @property
    def emergency(self) -> bool:
        heard = self.onair.heard if self.onair is not None else None
        return bool(heard is not None and heard.keyed and heard.emergency)


@dataclass(frozen=True)
class TalkerTerms:
    """What a link leg needs for the talker extension the two sides agreed in SDP."""

    ext_id: int
    peer_site: str
    link: str
    share: str
    rejected: collections.Counter
    audit: Callable[..., None]
    onward: bool = True  # the share's ``onward``: a relay may pass our audio on


@dataclass
class NameState:
    """One shared name on the link, as this side sees it."""

    name: str
    dialog: Dialog | None = None
    dialling: bool = False
    state: str = "down"
    since: float = field(default_factory=time.monotonic)
    cut_by_peer: bool = False
    rtt: float | None = None
    refusals: int = 0


class Trunk:
    """One link: its dialogs, one per shared name, and the loops that keep them up."""

    def __init__(
        self,
        name: str,
        config: LinkConfig,
        site_id: str,
        calls: CallManager,
        engine: Engine,
        audit: Callable[..., None],
        cut: Callable[[], tuple[bool, frozenset[str]]],
    ) -> None:
        self.name = name
        self.config = config
        self.site_id = site_id
        self.calls = calls
        self.engine = engine
        self.audit = audit
        self._cut = cut  # () → (the whole link is cut, shared names cut), from the cut store
        self.peer_site: str | None = None
        self.names = {n: NameState(n) for n in config.shares().names}
        self.refused_invites = 0
        self.keepalive_timeouts = 0  # dialogs ended because the peer stopped answering
        self.talker_rejected: collections.Counter[str] = collections.Counter()  # by reason
        self.labels_unanswered = 0  # our label INFOs the peer did not accept
        self._label_budget = labels.Budget()  # the peer's label INFOs
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}  # shared name → its keep loop
        self._keepalives: dict[str, asyncio.Task] = {}
        self._probe: asyncio.Future | None = None  # the link's keepalive round: rtt or None
        self._probe_sent = -KEEPALIVE
        self._stopped = False  # stopped or retired: no dialog may come up any more
        self._cas = load_certificates(config.peer_ca, "peer CA bundle") if config.peer_ca else []
        self._pins = frozenset(config.peer_fingerprints)

    # --- who the peer is ---------------------------------------------------------------

    def recognises(self, source: Source) -> bool:
        """The TLS peer proved it is this link's peer: its certificate was issued by the
        peer's CA and carries the peer's name, and/or is pinned (with both, both hold).
        The handshake already verified it against the CAs the listener trusts."""
        if not (source.secure and source.certificate):
            return False
        if self._pins and hashlib.sha256(source.certificate).hexdigest() not in self._pins:
            return False
        if not self._cas:
            return bool(self._pins)  # pinned, and the pin matched
        if source.identity != self.config.expected_peer_name:
            return False
        try:
            leaf = x509.load_der_x509_certificate(source.certificate)
        except ValueError:
            return False
        for ca in self._cas:
            with contextlib.suppress(Exception):  # wrong issuer, bad signature, other key type
                leaf.verify_directly_issued_by(ca)
                return True
        return False

    # --- what crosses -------------------------------------------------------------------

    def shares(self) -> Shares:
        """What we offer now: the config's shares less what is cut."""
        whole, names = self._cut()
        shares = self.config.shares()
        return shares.without(shares.names) if whole else shares.without(names)

    def is_cut(self, name: str) -> bool:
        whole, names = self._cut()
        return whole or name in names

    # --- running -------------------------------------------------------------------------

    def start(self) -> None:
        for name in self.names:
            self._tasks[name] = asyncio.ensure_future(self._keep(name))

    async def stop(self) -> None:
        self._stopped = True
        tasks = [*self._tasks.values(), *self._keepalives.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        self._keepalives.clear()
        if self._probe is not None:
            self._probe.cancel()

    def retire(self) -> list:
        """The link was removed or changed who it is by a reload: every dialog ends now
        (a plain BYE: the peer redials and is refused, or finds the new link) and the
        loops stop. The BYEs to send are returned."""
        self._stopped = True
        byes = [self._end(st) for st in self.names.values() if st.dialog is not None]
        for task in [*self._tasks.values(), *self._keepalives.values()]:
            task.cancel()
        self._tasks.clear()
        self._keepalives.clear()
        if self._probe is not None:
            self._probe.cancel()
        return [bye for bye in byes if bye is not None]

    def reshare(self, config: LinkConfig) -> list:
        """A reload changed only what the link shares: a name no longer offered, or now
        offered from another talkgroup or in another direction, ends its dialog now
        (redialled under the new terms if still shared); a new name starts its loop;
        the others' dialogs are left alone. The BYEs to send are returned."""
        old, new = self.config.shares(), config.shares()
        self.config = config
        byes = []
        for name in list(self.names):
            if old.entry(name) == new.entry(name):
                continue
            st = self.names[name]
            if st.dialog is not None:
                byes.append(self._end(st))
            if name not in new.names:
                del self.names[name]
                task = self._tasks.pop(name, None)
                if task is not None:
                    task.cancel()
            else:
                self._set(st, "down")
        for name in sorted(new.names - set(self.names)):
            self.names[name] = NameState(name)
            self._tasks[name] = asyncio.ensure_future(self._keep(name))
        self.changed()
        return [bye for bye in byes if bye is not None]

    def _end(self, st: NameState):  # noqa: ANN202 - the BYE coroutine, or None
        dialog, st.dialog = st.dialog, None
        task = self._keepalives.pop(st.name, None)
        if task is not None:
            task.cancel()
        return self.calls.end(dialog, 1.0)

    def changed(self) -> None:
        """A cut or restore: the keep loops look again now (no waiting out a backoff)."""
        self._wake.set()
        self._wake = asyncio.Event()

    async def _wait(self, seconds: float | None, dialog: Dialog | None = None) -> None:
        """Sleep until ``seconds`` pass, ``dialog`` ends or a cut/restore happens."""
        waits = [asyncio.ensure_future(self._wake.wait())]
        if dialog is not None:
            waits.append(asyncio.ensure_future(dialog.ended.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    def _set(self, st: NameState, state: str) -> None:
        if st.state != state:
            log.info("link %s %s: %s → %s", self.name, st.name, st.state, state)
            self.audit("link_state", link=self.name, share=st.name, state=state, was=st.state)
            st.state = state
            st.since = time.monotonic()

    async def _keep(self, name: str) -> None:
        """Keep one dialog up for ``name`` while it is shared and not cut."""
        st = self.names[name]
        backoff = BACKOFF_MIN
        while True:
            if self.is_cut(name):
                self._set(st, "cut")
                await self._wait(None)
                continue
            if st.dialog is not None:
                started = time.monotonic()
                await self._wait(None, st.dialog)
                if time.monotonic() - started >= STABLE:
                    backoff = BACKOFF_MIN
                continue
            if st.state in ("up", "cut"):
                self._set(st, "down")
            dialog = await self._dial(st)
            if dialog is None and st.dialog is None:
                if st.cut_by_peer:
                    self._set(st, "cut_by_peer")
                await self._wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _dial(self, st: NameState) -> Dialog | None:
        """Dial ``st.name`` at the peer, then the backup; the dialog that came up, or None."""
        share = self.shares().entry(st.name)
        if share is None:
            return None
        talkgroup, mine = share
        st.dialling = True
        try:
            for host, port in self.config.addresses:
                peer = Source((host, port), "tls")
                uri = f"sips:{st.name}@{host}:{port}"
                flows: list[tuple[Flow, TalkerTerms | None]] = []

                def accept(
                    dialog: Dialog, offer: MediaOffer, name: str = st.name, flows: list = flows
                ) -> bool:
                    flow = self.shares().answer(name, from_sdp(offer.direction))
                    if isinstance(flow, Refused):
                        log.warning(
                            "link %s %s: the peer's answer does not meet our share (%s)",
                            self.name,
                            name,
                            flow.reason,
                        )
                        return False
                    terms = self._talker_terms(offer, name)
                    if terms is None:
                        dialog.extmap = None  # not agreed: none in our re-INVITE answers either
                    flows.append((flow, terms))
                    return True

                refusal: list[tuple[int, str]] = []
                dialog = await self.calls.dial(
                    uri,
                    talkgroup,
                    _settings(talkgroup, uri),
                    peer,
                    from_user=self.site_id,
                    base=f"link-{self.name}-{st.name}",
                    codecs=self.codecs(),
                    direction=to_sdp(mine),
                    make_port=lambda *a, f=flows, **k: LinkLeg(
                        *a, **k, flow=f[0][0], talker=f[0][1], peer_site=self.peer_site or ""
                    ),
                    accept=accept,
                    refused=lambda code, reason, r=refusal: r.append((code, reason)),
                    extmap=talker_extmap(self.site_id),
                )
                if dialog is not None:
                    st.cut_by_peer = False
                    self._established(st, dialog)
                    return dialog
                if refusal:  # the peer answered: no use trying the backup
                    code, reason = refusal[0]
                    st.cut_by_peer = code == 403 and "cut" in reason.lower()
                    return None
            return None
        finally:
            st.dialling = False

    # --- answering ------------------------------------------------------------------------

    def on_invite(self, message: SipMessage) -> None:
        """An INVITE from this link's (verified) peer for one shared name."""
        request_uri = message.uri
        name = uri_user(request_uri)
        caller = uri_user(message.sender.uri)
        if _SITE.match(caller):
            self.peer_site = caller
        if self._stopped:  # shutting down or retired by a reload: the peer will redial
            self.calls.reject(message, 503, "Service Unavailable", "link stopping")
            return
        if name in self.names and self.is_cut(name):
            self.refused_invites += 1
            self.calls.reject(
                message,
                403,
                "Forbidden",
                f"link {self.name} is cut here",
                (f"Reason: {CUT_REASON}",),
            )
            return
        offer = read_offer(message)
        theirs = from_sdp(offer.direction) if offer else None
        flow = self.shares().answer(name, theirs)
        if isinstance(flow, Refused):  # unshared, unknown or garbage: the same answer
            self.refused_invites += 1
            self.calls.reject(message, 403, "Forbidden", f"link {self.name}: not shared")
            return
        st = self.names[name]
        old = st.dialog
        ours = (old is not None and not old.incoming) or st.dialling
        if ours and self._we_win():  # our dialog (placed or in flight) is the one to keep
            self.calls.reject(message, 491, "Request Pending", "link glare: ours wins")
            return
        settings = _settings(flow.talkgroup, request_uri)
        terms = self._talker_terms(offer, name)
        dialog = self.calls.answer(
            message,
            base=f"link-{self.name}-{name}",
            talkgroup=flow.talkgroup,
            settings=settings,
            direction=flow.sdp,
            make_port=lambda *a, **k: LinkLeg(
                *a, **k, flow=flow, talker=terms, peer_site=self.peer_site or ""
            ),
            extmap=(terms.ext_id, talker_extmap(self.site_id)[1]) if terms else None,
            codecs=self.codecs(),
        )
        if dialog is not None:
            st.cut_by_peer = False
            self._established(st, dialog)

    def codecs(self) -> list[str]:
        """What the link's dialogs offer and accept, preferred first: the configured list
        (Opus, then G.711 µ-law), without Opus where libopus cannot run with this engine
        (no libopus, 32 kHz, 10 ms frames)."""
        bank = self.calls.bank
        usable = opus_available(bank.rate, bank.frame_seconds)
        return [c for c in self.config.codecs if c != "opus" or usable]

    def _talker_terms(self, offer: MediaOffer | None, share: str) -> TalkerTerms | None:
        """The talker extension, when the peer's SDP agrees to it (else: keyed by voice)."""
        found = agreed(offer, self.site_id)
        if found is None:
            return None
        ext_id, peer_site = found
        onward = all(e.onward for e in self.config.share.values() if e.shared == share)
        return TalkerTerms(
            ext_id, peer_site, self.name, share, self.talker_rejected, self.audit, onward
        )

    def _we_win(self) -> bool:
        """Glare: the dialog placed by the lower site ID is kept (on both sides)."""
        return self.peer_site is None or self.site_id < self.peer_site

    def _established(self, st: NameState, dialog: Dialog) -> None:
        """A dialog for ``st.name`` came up; if another is up too, keep one by the rule.

        One that comes up after the trunk stopped (a dial answered while the gateway was
        shutting down) is hung up at once: nothing would keep it alive or end it."""
        if self._stopped:
            asyncio.ensure_future(self.calls.hangup(dialog, 1.0))
            return
        dialog.on_info = lambda message: self._on_info(dialog, message)
        onair = getattr(dialog.leg, "onair", None)
        if onair is not None:
            onair.tell = lambda named: self._tell(dialog, named)
            onair.tell_topology = lambda said: self._tell_topology(dialog, said)
        old = st.dialog
        keep, drop = dialog, old
        if old is not None and not old.ended.is_set() and old.incoming != dialog.incoming:
            ours = dialog if not dialog.incoming else old
            theirs = old if ours is dialog else dialog
            keep, drop = (ours, theirs) if self._we_win() else (theirs, ours)
        st.dialog = keep
        if drop is not None and drop is not keep:
            asyncio.ensure_future(self.calls.hangup(drop, 1.0))
        if keep is dialog:
            self._set(st, "up")
            self.changed()  # a keep loop waiting on the old dialog looks again
            task = self._keepalives.pop(st.name, None)
            if task is not None:
                task.cancel()
            self._keepalives[st.name] = asyncio.ensure_future(self._keepalive(st, dialog))

    async def _keepalive(self, st: NameState, dialog: Dialog) -> None:
        """The link's keepalive, for this dialog: no answer in time → the link is dead:
        end the dialog."""
        try:
            while not dialog.ended.is_set():
                rtt = await self._peer_answers(dialog)
                if dialog.ended.is_set():
                    break
                if rtt is ...:  # the round's dialog ended under it: ask again
                    continue
                if rtt is None:
                    self.keepalive_timeouts += 1
                    log.warning(
                        "link %s %s: no answer to keepalive; dropping the dialog",
                        self.name,
                        st.name,
                    )
                    await self.calls.hangup(dialog, 0.2)
                    break
                st.rtt = rtt
                await self._wait(KEEPALIVE, dialog)
        finally:
            onair = getattr(dialog.leg, "onair", None)
            if onair is not None:
                onair.close()  # an over still keyed ends with the dialog (audited)
            if st.dialog is dialog:
                st.dialog = None
                if "cut" in dialog.far_end_reason.lower():
                    st.cut_by_peer = True
                    self._set(st, "cut_by_peer")
                elif not self.is_cut(st.name):
                    self._set(st, "down")
                self.changed()

    async def _peer_answers(self, dialog: Dialog):  # noqa: ANN202 - rtt, None or Ellipsis
        """The round trip of the link's latest keepalive round, None if the peer did not
        answer it, ``...`` if it could not tell (its dialog ended). A round older than
        :data:`KEEPALIVE` starts a new one, an OPTIONS in ``dialog``; meanwhile every
        dialog that asks waits for it."""
        loop = asyncio.get_running_loop()
        probe = self._probe
        if probe is None or (probe.done() and loop.time() - self._probe_sent >= KEEPALIVE):
            self._probe_sent = loop.time()
            probe = self._probe = asyncio.ensure_future(self._options(dialog))
        rtt = await asyncio.shield(probe)
        if rtt is ... and self._probe is probe:
            self._probe = None
        return rtt

    async def _options(self, dialog: Dialog):  # noqa: ANN202
        loop = asyncio.get_running_loop()
        sent = loop.time()
        answer = await self.calls.options(dialog, KEEPALIVE_TIMEOUT)
        if dialog.ended.is_set():
            return ...
        return None if answer is None else loop.time() - sent

    # --- talker labels, in the dialog ----------------------------------------------------

    def _tell(self, dialog: Dialog, named: labels.Named) -> bool:
        """Our label for a new over, to the peer; False: not yet (an answered dialog the peer
        has not ACKed may not be in its table yet)."""
        if not dialog.acked:
            return False
        answer = self.calls.info(dialog, labels.CONTENT_TYPE, labels.body(named), LABEL_TIMEOUT)
        if answer is not None:
            answer.add_done_callback(self._label_answered)
        return True

    def _tell_topology(self, dialog: Dialog, said: topology.Topology) -> bool:
        """How this side links in the shared name's talkgroup, to the peer (a relay's rule
        needs it); False: not yet."""
        if not dialog.acked or dialog.ended.is_set():
            return False
        body = topology.body(said)
        answer = self.calls.info(dialog, topology.CONTENT_TYPE, body, LABEL_TIMEOUT)
        if answer is not None:
            answer.add_done_callback(self._label_answered)
        return True

    def _label_answered(self, answer: asyncio.Future) -> None:
        response = None if answer.cancelled() or answer.exception() else answer.result()
        if response is None or response.status >= 300:
            self.labels_unanswered += 1
            log.debug(
                "link %s: a talker label was not accepted (%s)",
                self.name,
                "no answer" if response is None else response.status,
            )

    def _on_info(self, dialog: Dialog, message: SipMessage) -> tuple[int, str]:
        """The peer names one of its overs. Believed only from this link's verified peer
        (the dialog's tags are not a secret worth trusting alone), within its budget."""
        if not self.recognises(message.source):
            self.talker_rejected["stranger"] += 1
            return 403, "Forbidden"
        if not self._label_budget.take():
            self.talker_rejected["flood"] += 1
            return 503, "Service Unavailable"
        onair = getattr(dialog.leg, "onair", None)
        content_type, data = message.content_type, message.body
        if content_type == topology.CONTENT_TYPE:
            said = topology.read(content_type, data)
            if isinstance(said, Rejected) or onair is None:
                self.talker_rejected[said.reason if isinstance(said, Rejected) else "info"] += 1
                return 400, "Bad Request"
            onair.heard_topology(said)
            return 200, "OK"
        named = labels.read(content_type, data)
        if isinstance(named, Rejected) or onair is None:  # no talker extension: no labels
            self.talker_rejected[named.reason if isinstance(named, Rejected) else "info"] += 1
            return 400, "Bad Request"
        leg = dialog.leg
        before = leg.talker if isinstance(leg, LinkLeg) else ""
        onair.named(named)
        if isinstance(leg, LinkLeg) and leg.talker != before:
            self._renamed(leg)
        return 200, "OK"

    def _renamed(self, leg: LinkLeg) -> None:
        """The label of the over on the air came after the engine had already named it by
        the peer's site ID (talk_start, a floor grant): one ``talker_named`` event for the
        same over names the real talker to the audit, MQTT and the console's history.
        (Holding the first event until the label would make every far-side over's event a
        round trip late, and still need a fallback for a label that never comes.)"""
        engine = self.engine
        i = next((k for k, port in enumerate(engine.ports) if port is leg), -1)
        if not 0 <= i < len(engine.admitted) or not engine.admitted[i]:
            return  # not heard yet: the engine's own events will carry the label
        groups, g = engine.layout.groups, int(engine.layout.group_of[i])
        group = groups[g].name if g < len(groups) else None
        engine.emit(
            Event("talker_named", leg.name, group, tick=engine.tick_count, talker=leg.talker)
        )

    def cut(self, names: frozenset[str] | None) -> list:
        """End the dialogs of ``names`` (None: all) in this very call, saying why; the BYEs
        to send are returned. The keep loops then see the cut and wait for a restore."""
        byes = []
        for st in self.names.values():
            if (names is None or st.name in names) and st.dialog is not None:
                dialog, st.dialog = st.dialog, None
                bye = self.calls.end(dialog, 1.0, reason=CUT_REASON)
                if bye is not None:
                    byes.append(bye)
                self._set(st, "cut")
        self.changed()
        return byes

    # --- reports -------------------------------------------------------------------------

    def state(self) -> str:
        """The link as a whole: up if any name is up, else cut, cut_by_peer or down."""
        whole, _ = self._cut()
        states = {st.state for st in self.names.values()}
        if whole:
            return "cut"
        for state in ("up", "cut_by_peer", "cut"):
            if state in states:
                return state
        return "down"

    def up_seconds(self) -> float:
        ups = [time.monotonic() - st.since for st in self.names.values() if st.state == "up"]
        return max(ups, default=0.0)

    def rtt(self) -> float | None:
        rtts = [st.rtt for st in self.names.values() if st.state == "up" and st.rtt is not None]
        return min(rtts) if rtts else None


def _settings(talkgroup: str, uri: str) -> DialOutConfig:
    """The leg's terms: SRTP required (SDES keys over the link's TLS); keyed by voice
    activity unless the talker extension is agreed (then by what the peer says)."""
    return DialOutConfig(talkgroup=talkgroup, uri=uri, srtp="required")
