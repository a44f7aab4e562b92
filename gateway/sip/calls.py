"""Calls: dialled number → talkgroup, answer at once, attach the leg; BYE either way.

Routing is the config's ``[sip.routes]``: the Request-URI user (or the To user)
picks the route; :mod:`gateway.sip.admission` decides who may call it (digest
challenge 401, refusal 403, caps 503) and a PIN route's caller is gated by
:mod:`gateway.sip.pin`; an unknown number is refused with 404, an offer without
G.711 with 488 — never a silent hang. SRTP (SDES keys in the SDP) is agreed only
over TLS and as the route's ``srtp`` policy says; an offer the policy cannot take
(plain under ``required``, keys over UDP) gets 488. Calls are answered straight
away with 200 OK (no ringing delay) and become a :class:`~gateway.sip.leg.SipLeg`
attached to the engine; they end on BYE from either side, and the gateway sends BYE
to every call when it stops. Leg names carry the route, never the caller
(``sip-6001#3``): the audit log is where a caller is named. An INFO in a dialog
goes to whoever owns it (``Dialog.on_info``: a link's talker labels); a phone's
INFO gets 501 as before.

Every dialog has a timer that ends it, because a stranger can open one: an
answered call sends no RTP until its ACK, and one never ACKed is ended with BYE
after ``ack_timeout`` (RFC 3261 §13.3.1.4, Timer H = 64·T1 = 32 s); a call whose
peer sends neither RTP nor RTCP for ``media_timeout`` is ended with BYE. One
periodic sweep on the event loop checks both for every call.

A call's media address is the peer's word, so it is checked before anything is
sent to it: an IPv4 address and a real port, not the gateway's own media port,
and not a media address another call already uses (that would double our stream
to that caller and later hand its packets to the newcomer) unless both calls
announced SSRCs that tell them apart (``a=ssrc``, which BorderLink itself does:
all its calls leave from one port). Such an offer is refused with 488. A
re-INVITE moves the media (address, port, codec) in one step once all of that is
checked, or is refused with 488 and the call goes on as it was; its codec comes from
the list the call was set up with (a link's own ``codecs``, not the site's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.config import Timing
from gateway.engine import Engine
from gateway.sip.admission import Admission, Refusal
from gateway.sip.bank import LegBank
from gateway.sip.config import (
    DialOutConfig,
    RouteConfig,
    SipConfig,
    SrtpPolicy,
    strictest,
)
from gateway.sip.leg import SipLeg, leg_config
from gateway.sip.legmedia import LegMedia
from gateway.sip.message import SipMessage
from gateway.sip.pin import gate_call
from gateway.sip.rtcp import RtcpState
from gateway.sip.rtp import CODEC_NAMES, OPUS
from gateway.sip.sdp import (
    AVP,
    DTMF_TYPE,
    NAMES,
    SAVP,
    MediaOffer,
    choose_codec,
    describe,
    payload_type,
    read_offer,
)
from gateway.sip.srtp import Crypto, LegSrtp, accept_keys, new_crypto
from gateway.sip.transport import (
    T1,
    T2,
    Address,
    SipTransport,
    Source,
    as_source,
    new_call_id,
    new_tag,
    uri_source,
)

log = logging.getLogger(__name__)

_URI = re.compile(r"^sips?:(?:(?P<user>[^@;>]+)@)?(?P<host>[^:;>]+)(?::(?P<port>\d+))?")


def uri_user(uri: str) -> str:
    match = _URI.match(uri.strip("<> "))
    return match["user"] or "" if match else ""


@dataclass
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: str  # our From/To value, without tag
    remote_uri: str
    target: str  # the peer's Contact: where in-dialog requests go (Request-URI)
    peer: Source  # the next hop (the proxy, or the phone itself), and over which transport
    incoming: bool
    route: str = ""  # the [sip.routes] entry an incoming call was answered under
    leg: SipLeg | None = None
    cseq: int = 1
    answer: bytes = b""  # our final answer to the peer's last INVITE, resent on retransmissions
    acked: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    far_end_reason: str = ""  # the Reason header of the far end's BYE (RFC 3326), if any
    created: float = 0.0  # event-loop time the dialog began (Timer H counts from here)
    remote_cseq: int = 0  # CSeq of the peer's last INVITE: a retransmission or a re-INVITE
    acked_cseq: int = 0  # CSeq of the last INVITE the peer ACKed
    offer: MediaOffer | None = None  # the peer's media as it stands
    body: str = ""  # our SDP as it stands
    session: int = 0  # SDP o= session id and version (RFC 3264 §8: +1 on each change)
    version: int = 0
    profile: str = AVP  # our m= line's profile, and our SDES key on an SRTP call
    crypto: Crypto | None = None
    direction: str = "sendrecv"  # our SDP direction (a link's share), kept on re-INVITEs
    extmap: tuple[int, str] | None = None  # an RTP header extension we agreed (a link's talker)
    codecs: list[str] | None = None  # what it may use, re-INVITEs too (a link's); None: the site's
    # Who answers the peer's INFO in this dialog (a link's talker labels): (code, reason).
    on_info: Callable[[SipMessage], tuple[int, str]] | None = None


class CallManager:
    """All dialogs of the gateway, and the one place legs join and leave the engine."""

    def __init__(
        self,
        config: SipConfig,
        transport: SipTransport,
        engine: Engine,
        timing: Timing,
        bank: LegBank,
        address: str,
    ) -> None:
        self.config = config
        self.transport = transport
        self.engine = engine
        self.timing = timing
        self.bank = bank
        self.address = address
        self.dialogs: dict[str, Dialog] = {}
        self._loop = asyncio.get_running_loop()
        self.rejected: dict[int, int] = {}
        self.timed_out = {"ack": 0, "media": 0}  # calls ended by Timer H / media timeout
        self.calls_total = 0
        self._names = 0
        self._tasks: set[asyncio.Task] = set()
        self.admission = Admission(lambda: self.config, lambda: len(self.dialogs), self._calls_from)
        # The site's audit log (set by the service): record(event, **fields).
        self.audit: Callable[..., Any] = lambda event, **fields: None
        # Cross-border links (set by the links service): offered every new INVITE that came
        # over TLS from a verified peer, before routes; True when it took (answered) it.
        self.links: Callable[[SipMessage], bool] | None = None
        self._sweep_every = min(1.0, config.ack_timeout / 4, config.media_timeout / 4)
        self._sweeper = asyncio.get_event_loop().call_later(self._sweep_every, self._sweep)

    def _calls_from(self, host: str) -> int:
        return sum(1 for d in self.dialogs.values() if d.incoming and d.peer.address[0] == host)

    def contact_for(self, peer: Source) -> str:
        """Our Contact in a dialog with ``peer``: over the transport the dialog uses."""
        return self.transport.contact(self.config.user, self.address, peer)

    # --- requests from the network ---------------------------------------------------

    def on_request(self, message: SipMessage) -> None:
        method = message.method
        respond = self.transport.respond
        if method == "INVITE":
            self._invite(message)
        elif method == "ACK":
            dialog = self.dialogs.get(message.call_id)
            if dialog is not None and self._from_peer(dialog, message):
                self._acked(dialog, message.cseq)
        elif method == "BYE":
            dialog = self.dialogs.get(message.call_id)
            if dialog is None or not self._from_peer(dialog, message):
                respond(message, 481, "Call/Transaction Does Not Exist")
                return
            respond(message, 200, "OK")
            dialog.far_end_reason = message.headers.get("reason")[:200]
            log.info(
                "call %s ended by the far end", dialog.leg.name if dialog.leg else dialog.call_id
            )
            self._end(dialog)
        elif method == "CANCEL":
            # We answer INVITEs at once, so there is never a pending one to cancel.
            if message.call_id in self.dialogs:
                respond(message, 200, "OK")
            else:
                respond(message, 481, "Call/Transaction Does Not Exist")
        elif method == "INFO":
            dialog = self.dialogs.get(message.call_id)
            if dialog is None or not self._from_peer(dialog, message):
                respond(message, 481, "Call/Transaction Does Not Exist")
            elif dialog.on_info is None:  # a phone's INFO (DTMF relay...): as before, unknown
                respond(message, 501, "Not Implemented")
            else:
                code, reason = dialog.on_info(message)
                respond(message, code, reason)
        elif method == "OPTIONS":
            respond(
                message,
                200,
                "OK",
                headers=[
                    "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, INFO",
                    "Accept: application/sdp",
                ],
            )

    def reject(
        self,
        request: SipMessage,
        code: int,
        reason: str,
        why: str,
        headers: tuple[str, ...] = (),
    ) -> None:
        """Refuse an INVITE (counted, logged at most once a minute per source)."""
        self._reject(request, code, reason, why, headers)

    @staticmethod
    def _from_peer(dialog: Dialog, message: SipMessage) -> bool:
        """An in-dialog request carries the dialog's tags (RFC 3261 §12.2.2)."""
        return message.sender.tag == dialog.remote_tag and message.recipient.tag == dialog.local_tag

    def _acked(self, dialog: Dialog, cseq: int) -> None:
        """The peer confirmed our answer to its INVITE ``cseq``: the call may send now."""
        dialog.acked_cseq = max(dialog.acked_cseq, cseq)
        if not dialog.acked:
            dialog.acked = True
            if dialog.leg is not None:
                self.bank.start_sending(dialog.leg.row)

    # --- timers -----------------------------------------------------------------------

    def _sweep(self) -> None:
        """Once a second: end calls never ACKed (Timer H) and calls whose media stopped."""
        loop = asyncio.get_event_loop()
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        now = loop.time()
        for dialog in list(self.dialogs.values()):
            if (
                dialog.incoming
                and not dialog.acked
                and now - dialog.created >= (self.config.ack_timeout)
            ):
                self.timed_out["ack"] += 1
                log.info("call %s never confirmed (no ACK); hanging up", self._name(dialog))
                self._spawn(self.hangup(dialog))
        silent = set(self.bank.silent_rows(self.config.media_timeout).tolist())
        if silent:
            for dialog in list(self.dialogs.values()):
                if dialog.leg is not None and dialog.leg.row in silent:
                    self.timed_out["media"] += 1
                    log.info(
                        "call %s: no RTP or RTCP for %gs; hanging up",
                        self._name(dialog),
                        self.config.media_timeout,
                    )
                    self._spawn(self.hangup(dialog))

    @staticmethod
    def _name(dialog: Dialog) -> str:
        return dialog.leg.name if dialog.leg else dialog.call_id

    # --- media checks -----------------------------------------------------------------

    def _media_refused(self, offer: MediaOffer | None, codec: int | None, row: int = -1) -> str:
        """Why an offer's media cannot be taken ("" when it can); ``row``: the call itself."""
        if offer is None or codec is None:
            return "no G.711 in the offer"
        if not offer.usable:
            return f"media address {offer.address}:{offer.port} is not an IPv4 address and port"
        where = (offer.address, offer.port)
        if offer.port in (self.bank.port, self.bank.port + 1) and offer.address in (
            self.bank.host,
            self.address,
        ):
            return "the offer names the gateway's own media port"
        others = [r for r in self.bank.rows_using(where) if r != row]
        ours = set(offer.ssrcs)
        for other in others:
            media = self.bank.table.media[other]
            theirs = set(media.announced) if media is not None else set()
            if not ours or not theirs or ours & theirs:
                return (
                    f"media address {offer.address}:{offer.port} is in use by another call "
                    "and no announced SSRCs tell them apart"
                )
        return ""

    def _reject(
        self,
        request: SipMessage,
        code: int,
        reason: str,
        why: str,
        headers: tuple[str, ...] = (),
    ) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1
        self.admission.refusals(request.source.address[0], code, reason, why)
        self.transport.respond(request, code, reason, to_tag=new_tag(), headers=[*headers])

    def _refuse(self, request: SipMessage, refusal: Refusal, route: str = "") -> None:
        if refusal.audit:
            where = request.source.address[0]
            self.audit(refusal.audit, route=route, source=where, reason=refusal.why)
        self._reject(request, refusal.code, refusal.reason, refusal.why, refusal.headers)

    def _invite(self, message: SipMessage) -> None:
        call_id, source = message.call_id, message.source
        existing = self.dialogs.get(call_id)
        if existing is not None:  # a retransmission or a re-INVITE
            self._reinvite(existing, message)
            return
        linked = self.links is not None and source.secure and bool(source.identity)
        if linked and self.links(message):  # type: ignore[misc]
            return
        limited = self.admission.limit(source)
        if limited is not None:
            self._refuse(message, limited)
            return
        request_uri = message.uri
        number = uri_user(request_uri) or message.recipient.user
        found = self.config.route_for(number)
        if found is None and message.recipient.user:
            found = self.config.route_for(message.recipient.user)
        if found is None:
            self._reject(message, 404, "Not Found", f"no route for number {number!r}")
            return
        name, route = found
        admitted = self.admission.identify(name, route, source, "INVITE", call_id, message.headers)
        if isinstance(admitted, Refusal):
            self._refuse(message, admitted, name)
            return
        offer = read_offer(message)
        codec = choose_codec(offer, self.config.codecs, self._ptime) if offer else None
        why = self._media_refused(offer, codec)
        if why:
            self._reject(message, 488, "Not Acceptable Here", why)
            return
        policy = self._srtp_policy(route, request_uri, source)
        peer_key, refusal = accept_keys(policy, source.transport, offer.savp, offer.crypto)
        if refusal:
            self._reject(message, 488, "Not Acceptable Here", f"route {name}: {refusal}")
            return
        assert offer is not None and codec is not None
        if route.talkgroup not in self.engine.talkgroups:
            self._reject(
                message,
                480,
                "Temporarily Unavailable",
                f"talkgroup {route.talkgroup!r} is not running",
            )
            return
        dialog = self._incoming_dialog(message, offer, route=name)
        dtmf = DTMF_TYPE if offer.dtmf_type is not None else None
        dtmf_in = offer.dtmf_type
        pin = gate_call(self, dialog, name, route) if route.pin else None
        ours = new_crypto(peer_key.tag) if peer_key else None
        leg = self._start_leg(
            f"sip-{name}",
            codec,
            dtmf_in,
            dtmf,
            offer,
            route.talkgroup,
            route.priority,
            route,
            on_pin=pin.press if pin else None,
            srtp=LegSrtp(peer_key.key, ours.key) if peer_key and ours else None,
        )
        dialog.leg = leg
        self.dialogs[call_id] = dialog
        dialog.profile = offer.profile if ours else AVP
        dialog.crypto = ours
        dialog.body = self._describe(dialog, codec, dtmf_in, offer.rtcp_mux)
        self._answer(dialog, message)
        log.info(
            "call %s answered: %s%s on %s",
            leg.name,
            CODEC_NAMES[codec],
            " with SRTP" if ours else "",
            route.talkgroup,
        )
        self.audit(
            "sip_call",
            port=leg.name,
            route=name,
            talkgroup=route.talkgroup,
            caller=admitted.identity,
            auth=admitted.how,
            source=source.address[0],
            pin="required" if pin else None,
            srtp=bool(ours),
        )

    def _srtp_policy(self, route: RouteConfig, request_uri: str, source: Source) -> SrtpPolicy:
        """The route's ``srtp``, with that of the account a call came through (the one whose
        extension it was sent to, or whose registrar sent it): see :func:`strictest`."""
        user = uri_user(request_uri)
        accounts = [
            account.srtp
            for account in self.config.accounts.values()
            if account.username == user or account.next_hop[:2] == source.address
        ]
        return strictest(route.srtp, *accounts)

    def _incoming_dialog(self, message: SipMessage, offer: MediaOffer, **extra: Any) -> Dialog:
        """The dialog an INVITE we answer opens (a route's call or a link's)."""
        dialog = Dialog(
            call_id=message.call_id,
            local_tag=new_tag(),
            remote_tag=message.sender.tag,
            local_uri=message.recipient.text,
            remote_uri=message.sender.text,
            target=message.contact or message.uri,
            peer=message.source,
            incoming=True,
            created=asyncio.get_event_loop().time(),
            remote_cseq=message.cseq,
            offer=offer,
            session=random.getrandbits(31),
            **extra,
        )
        dialog.version = dialog.session
        return dialog

    def answer(
        self,
        message: SipMessage,
        *,
        base: str,
        talkgroup: str,
        settings: DialOutConfig,
        direction: str = "sendrecv",
        make_port: Callable[..., SipLeg] = SipLeg,
        extmap: tuple[int, str] | None = None,
        codecs: list[str] | None = None,
    ) -> Dialog | None:
        """Answer an INVITE someone else admitted (a link): a leg on ``talkgroup`` built by
        ``make_port``, our SDP saying ``direction`` (and ``extmap``, an RTP header extension
        the offer asked for), SRTP as ``settings.srtp`` says, the first of the offer's
        codecs that ``codecs`` (default: the site's) allows. None (and a 488) without such
        a codec or without the SRTP the settings require."""
        offer = read_offer(message)
        codec = choose_codec(offer, codecs or self.config.codecs, self._ptime) if offer else None
        why = self._media_refused(offer, codec)
        if why:
            self._reject(message, 488, "Not Acceptable Here", why)
            return None
        assert offer is not None and codec is not None
        transport = message.source.transport
        peer_key, refusal = accept_keys(settings.srtp, transport, offer.savp, offer.crypto)
        if refusal:
            self._reject(message, 488, "Not Acceptable Here", f"{base}: {refusal}")
            return None
        ours = new_crypto(peer_key.tag) if peer_key else None
        dialog = self._incoming_dialog(
            message, offer, direction=direction, extmap=extmap, codecs=codecs
        )
        dialog.leg = self._start_leg(
            base,
            codec,
            offer.dtmf_type,
            None,
            offer,
            talkgroup,
            settings.priority,
            settings,
            srtp=LegSrtp(peer_key.key, ours.key) if peer_key and ours else None,
            make_port=make_port,
        )
        self.dialogs[dialog.call_id] = dialog
        dialog.profile = offer.profile if ours else AVP
        dialog.crypto = ours
        dialog.body = self._describe(dialog, codec, None, offer.rtcp_mux)
        self._answer(dialog, message)
        return dialog

    def _describe(self, dialog: Dialog, codec: int, dtmf: int | None, mux: bool) -> str:
        assert dialog.leg is not None
        return describe(
            self.address,
            self.bank.port,
            [codec],
            dtmf,
            session_id=dialog.session,
            version=dialog.version,
            rtcp_mux=mux,
            ssrc=int(self.bank.table.tx_ssrc[dialog.leg.row]),
            cname=self.bank.rtcp.cname,
            profile=dialog.profile,
            crypto=dialog.crypto,
            direction=dialog.direction,
            extmap=dialog.extmap,
            opus_type=dialog.offer.opus_type if dialog.offer else OPUS,
            ptime=self._ptime,
        )

    @property
    def _ptime(self) -> int:
        """Our packet time in ms: one packet a tick, the engine's frame."""
        return round(1000 * self.bank.frame_seconds)

    def _answer(self, dialog: Dialog, invite: SipMessage) -> None:
        """200 OK with our SDP to the peer's INVITE, resent until the peer ACKs it."""
        dialog.answer = self.transport.respond(
            invite,
            200,
            "OK",
            to_tag=dialog.local_tag,
            headers=[f"Contact: {self.contact_for(invite.source)}"],
            body=dialog.body,
        )
        self._spawn(self._resend_until_ack(dialog, invite.source, dialog.remote_cseq))

    async def _resend_until_ack(self, dialog: Dialog, source: Source, cseq: int) -> None:
        """RFC 3261 §13.3.1.4: the 2xx is resent, T1 doubling to T2, until ACK or Timer H."""
        loop = asyncio.get_event_loop()
        give_up = loop.time() + self.config.ack_timeout
        answer = dialog.answer
        interval = T1
        while loop.time() + interval < give_up:
            await asyncio.sleep(interval)
            if dialog.acked_cseq >= cseq or dialog.ended.is_set() or dialog.answer is not answer:
                return
            self.transport.send(answer, source)
            interval = min(interval * 2, T2)

    def _reinvite(self, dialog: Dialog, message: SipMessage) -> None:
        """An INVITE inside a dialog: a retransmission gets the same answer; a re-INVITE
        moves the media in one step, or is refused (488) and the call stays as it was."""
        cseq = message.cseq
        respond = self.transport.respond
        if cseq == dialog.remote_cseq and dialog.answer:  # retransmission
            self.transport.send(dialog.answer, message.source)
            return
        if not self._from_peer(dialog, message):
            respond(message, 481, "Call/Transaction Does Not Exist")
            return
        if cseq < dialog.remote_cseq:  # RFC 3261 §12.2.2
            respond(message, 500, "Server Internal Error")
            return
        dialog.remote_cseq = cseq
        leg = dialog.leg
        if leg is None or dialog.offer is None:
            respond(message, 491, "Request Pending")
            return
        if not message.body:  # no offer: ours again (the ACK would carry the answer)
            self._answer(dialog, message)
            return
        offer = read_offer(message)
        codec = (
            choose_codec(offer, dialog.codecs or self.config.codecs, self._ptime) if offer else None
        )
        why = self._media_refused(offer, codec, leg.row)
        if why:
            self.rejected[488] = self.rejected.get(488, 0) + 1
            log.info("re-INVITE of call %s refused (the call goes on as it was): %s", leg.name, why)
            dialog.answer = respond(message, 488, "Not Acceptable Here")
            return
        assert offer is not None and codec is not None
        if offer != dialog.offer and (dialog.crypto or offer.savp or offer.crypto):
            # New keys would have to be agreed with the move: not done, so refused whole.
            self.rejected[488] = self.rejected.get(488, 0) + 1
            log.info("re-INVITE of SRTP call %s refused (media and keys stay)", leg.name)
            dialog.answer = respond(message, 488, "Not Acceptable Here")
            return
        if offer != dialog.offer:
            rtcp_port = offer.rtcp_port if offer.rtcp_port is not None else offer.port + 1
            mux = offer.rtcp_mux if dialog.incoming else False
            self.bank.move(
                leg.row,
                self.bank.table.media[leg.row],
                (offer.address, offer.port),
                RtcpState((offer.address, rtcp_port), mux=mux),
                payload_type(offer, codec),
                offer.dtmf_type if offer.dtmf_type is not None or dialog.incoming else DTMF_TYPE,
                offer.ssrcs,
                codec,
            )
            dialog.offer = offer
            dialog.version += 1
            dialog.body = self._describe(dialog, codec, offer.dtmf_type, mux)
            log.info(
                "call %s: media moved to %s:%d (%s)",
                leg.name,
                offer.address,
                offer.port,
                CODEC_NAMES[codec],
            )
        self._answer(dialog, message)

    # --- legs -------------------------------------------------------------------------

    def _start_leg(
        self,
        base: str,
        codec: int,
        dtmf_in: int | None,
        dtmf_out: int | None,
        offer: MediaOffer,
        talkgroup: str,
        priority: int,
        route: RouteConfig | DialOutConfig,
        on_pin: Callable[[str], None] | None = None,
        srtp: LegSrtp | None = None,
        ssrc: int | None = None,
        make_port: Callable[..., SipLeg] = SipLeg,
    ) -> SipLeg:
        """Put a call's media in the bank and its Port on the engine (loop thread only).

        With ``on_pin`` the leg starts muted both ways (the bank's ``muted`` column)
        and its key presses go to ``on_pin`` until that unmutes it. ``ssrc``: ours,
        when an offer already announced it (dial-out)."""
        self._names += 1
        self.calls_total += 1
        name = f"{base}#{self._names}"
        route_name = base.removeprefix("sip-")  # what metrics count the call under
        rtcp_port = offer.rtcp_port if offer.rtcp_port is not None else offer.port + 1
        media = LegMedia(
            payload_type=payload_type(offer, codec),
            codec=codec,
            dtmf_type=dtmf_in,
            remote=(offer.address, offer.port),
            rtcp=RtcpState((offer.address, rtcp_port), mux=offer.rtcp_mux),
            srtp=srtp,
            group=(route_name, talkgroup),
            ssrc=ssrc,
            announced=offer.ssrcs,
        )
        media.dtmf_type = dtmf_in if dtmf_in is not None else dtmf_out
        row = self.bank.add(media)
        bank = self.bank
        bank.table.vox[row] = route.ptt == "vox"
        bank.table.vox_threshold[row] = route.vox_threshold_dbfs
        bank.table.vox_hang[row] = round(route.vox_hang / self.timing.frame)
        bank.table.muted[row] = on_pin is not None
        talk_key = getattr(route, "dtmf_talk", "*")
        release_key = getattr(route, "dtmf_release", "#")

        def on_dtmf(digit: str, pressed: bool) -> None:
            if not pressed:
                return
            if bank.table.muted[row]:
                if on_pin is not None:
                    on_pin(digit)
                return
            if route.ptt == "dtmf":
                if digit == talk_key:
                    bank.table.ptt[row] = True
                elif digit == release_key:
                    bank.table.ptt[row] = False

        media.on_dtmf = on_dtmf
        leg = make_port(
            name,
            leg_config(getattr(route, "tot", 180.0), f"SIP call on {talkgroup}"),
            self.timing,
            bank,
            row,
            route=route_name,
        )
        leg.on_close = self._closed_by_site
        self.engine.attach(leg, talkgroup, priority)
        return leg

    def _closed_by_site(self, leg: SipLeg) -> None:
        """A reload removed the leg's talkgroup: say goodbye to the caller.

        Called where the site closes its ports (a worker thread, on a live reload)."""
        self._loop.call_soon_threadsafe(self._talkgroup_gone, leg)

    def _talkgroup_gone(self, leg: SipLeg) -> None:
        for dialog in list(self.dialogs.values()):
            if dialog.leg is leg:
                self.hang_up_soon(dialog, "its talkgroup was removed")

    def hang_up_soon(self, dialog: Dialog, why: str) -> None:
        """BYE in a task of ours (a reload cannot wait for the answer); logged with why."""
        log.info("call %s: %s; hanging up", dialog.leg.name if dialog.leg else dialog.call_id, why)
        self._spawn(self.hangup(dialog))

    def _end(self, dialog: Dialog) -> None:
        self.dialogs.pop(dialog.call_id, None)
        if dialog.leg is not None:
            dialog.leg.on_close = None
            self.engine.detach(dialog.leg)
            self.bank.remove(dialog.leg.row)
        dialog.ended.set()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- requests we send -------------------------------------------------------------

    def _in_dialog(
        self,
        dialog: Dialog,
        method: str,
        cseq: int | None = None,
        extra: tuple[str, ...] = (),
        body: tuple[str, str] | None = None,
    ) -> str:
        """An in-dialog request; a new CSeq unless given (an ACK to 2xx reuses the INVITE's);
        ``body``: (content type, text)."""
        if cseq is None:
            dialog.cseq += 1
            cseq = dialog.cseq
        lines = [
            f"{method} {dialog.target} SIP/2.0",
            self.transport.via(dialog.peer, self.address),
            "Max-Forwards: 70",
            f"From: {dialog.local_uri};tag={dialog.local_tag}",
            f"To: {dialog.remote_uri};tag={dialog.remote_tag}",
            f"Call-ID: {dialog.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: {self.contact_for(dialog.peer)}",
            "User-Agent: BorderLink",
            *extra,
        ]
        kind, text = body or ("", "")
        if kind:
            lines.append(f"Content-Type: {kind}")
        lines.append(f"Content-Length: {len(text.encode())}")
        return "\r\n".join(lines) + "\r\n\r\n" + text

    async def options(self, dialog: Dialog, timeout: float) -> SipMessage | None:
        """An in-dialog OPTIONS (a keepalive over the dialog's own connection): the answer."""
        if dialog.call_id not in self.dialogs:
            return None
        return await self.transport.request(
            self._in_dialog(dialog, "OPTIONS"), dialog.peer, timeout
        )

    def info(
        self, dialog: Dialog, content_type: str, text: str, timeout: float
    ) -> asyncio.Future[SipMessage | None] | None:
        """An in-dialog INFO, written in this very call when the dialog's connection is open
        (a link's talker label leaves before the RTP it names); the answer to come. None:
        the dialog has ended."""
        if dialog.call_id not in self.dialogs:
            return None
        request = self._in_dialog(dialog, "INFO", body=(content_type, text))
        return self.transport.request_now(request, dialog.peer, timeout)

    async def hangup(self, dialog: Dialog, wait: float = 2.0, reason: str = "") -> None:
        """Send BYE and end the leg now (the media stops even if the BYE gets no answer).
        ``reason`` is an RFC 3326 Reason header value (a link cut says why it ended)."""
        sending = self.end(dialog, wait, reason)
        if sending is not None:
            await sending

    def end(
        self, dialog: Dialog, wait: float = 2.0, reason: str = ""
    ) -> Coroutine[Any, Any, SipMessage | None] | None:
        """End the leg in this very call (no tick passes with its audio); the BYE still to
        be sent is returned (None: the dialog had already ended)."""
        if dialog.call_id not in self.dialogs:
            return None
        bye = self._in_dialog(dialog, "BYE", extra=(f"Reason: {reason}",) if reason else ())
        self._end(dialog)
        return self.transport.request(bye, dialog.peer, wait)

    async def hangup_all(self, wait: float = 0.4) -> None:
        dialogs = list(self.dialogs.values())
        if dialogs:
            await asyncio.gather(*(self.hangup(d, wait) for d in dialogs), return_exceptions=True)

    async def dial(
        self,
        uri: str,
        talkgroup: str,
        entry: DialOutConfig,
        proxy: Address | Source | None = None,
        offer_srtp: bool = True,
        *,
        from_user: str = "",
        base: str = "",
        codecs: list[str] | None = None,
        direction: str = "sendrecv",
        make_port: Callable[..., SipLeg] = SipLeg,
        accept: Callable[[Dialog, MediaOffer], bool] | None = None,
        refused: Callable[[int, str], None] | None = None,
        extmap: tuple[int, str] | None = None,
    ) -> Dialog | None:
        """Call out (a dial-out patch, a link); the answered call's Dialog, or None.

        Over TLS the offer is SRTP (RTP/SAVP with our key) unless the policy is off; under
        ``optional`` a far end that refuses it with 488 is called again with plain RTP.
        A link says who it is (``from_user``), which codecs and SDP ``direction`` it
        offers (and an RTP header ``extmap``), builds its own port, may turn down the
        answer (``accept``) and hears why it was refused (``refused(code, Reason header)``)."""
        destination = as_source(proxy) if proxy else uri_source(uri)
        if destination is None:
            log.warning("dial-out to %s: not a URI the gateway can call", uri)
            return None
        offered = [NAMES[c] for c in (codecs or self.config.codecs)]
        policy = getattr(entry, "srtp", "optional")
        if policy == "required" and not destination.secure:
            log.warning("dial-out to %s: SRTP required but the call would not go over TLS", uri)
            return None
        ours = new_crypto() if destination.secure and policy != "off" and offer_srtp else None
        ssrc = self.bank.new_ssrc()
        session = random.getrandbits(31)
        body = describe(
            self.address,
            self.bank.port,
            offered,
            DTMF_TYPE,
            profile=SAVP if ours else AVP,
            crypto=ours,
            direction=direction,
            session_id=session,
            ssrc=ssrc,
            cname=self.bank.rtcp.cname,
            extmap=extmap,
            ptime=self._ptime,
        )
        call_id = new_call_id(self.address)
        tag = new_tag()
        # sip: even over TLS (as our Contact): libre-based phones hang up on a sips: From.
        local_uri = f"<sip:{from_user or self.config.user}@{self.address}>"
        invite_lines = [
            f"INVITE {uri} SIP/2.0",
            self.transport.via(destination, self.address),
            "Max-Forwards: 70",
            f"From: {local_uri};tag={tag}",
            f"To: <{uri}>",
            f"Call-ID: {call_id}",
            "CSeq: 1 INVITE",
            f"Contact: {self.contact_for(destination)}",
            "Content-Type: application/sdp",
            "User-Agent: BorderLink",
            f"Content-Length: {len(body)}",
        ]
        invite = "\r\n".join(invite_lines) + "\r\n\r\n" + body
        response = await self.transport.request(
            invite, destination, self.config.transaction_timeout
        )
        if response is None or response.status >= 300:
            if response is not None:
                self._ack(response, uri, destination, call_id, tag, local_uri, invite_lines[1])
                if response.status == 488 and ours is not None and policy == "optional":
                    log.info("dial-out to %s refused SRTP; calling again with plain RTP", uri)
                    return await self.dial(
                        uri,
                        talkgroup,
                        entry,
                        proxy,
                        False,
                        from_user=from_user,
                        base=base,
                        codecs=codecs,
                        direction=direction,
                        make_port=make_port,
                        accept=accept,
                        refused=refused,
                        extmap=extmap,
                    )
                if refused is not None:
                    refused(response.status, response.headers.get("reason"))
            log.warning(
                "dial-out to %s failed: %s",
                uri,
                "no answer" if response is None else f"{response.status}",
            )
            return None
        offer = read_offer(response)
        codec = choose_codec(offer, codecs or self.config.codecs, self._ptime) if offer else None
        dialog = Dialog(
            call_id=call_id,
            local_tag=tag,
            remote_tag=response.recipient.tag,
            local_uri=local_uri,
            remote_uri=f"<{uri}>",
            target=response.contact or uri,
            peer=destination,
            incoming=False,
            created=asyncio.get_event_loop().time(),
            offer=offer,
            body=body,
            session=session,
            version=session,
            profile=SAVP if ours else AVP,
            crypto=ours,
            direction=direction,
            extmap=extmap,
            codecs=codecs,
        )
        self.dialogs[call_id] = dialog
        self.transport.send(self._in_dialog(dialog, "ACK", cseq=1), destination)
        dialog.acked = True
        why = self._media_refused(offer, codec)
        if why:
            log.warning("dial-out to %s: %s; hanging up", uri, why)
            await self.hangup(dialog)
            return None
        srtp = None
        if ours is not None:  # the answer must carry its key under our offer's tag
            peer_key = next((c for c in offer.crypto if c.tag == ours.tag), None)
            if peer_key is None:
                log.warning("dial-out to %s: answer has no SRTP key for our offer; hanging up", uri)
                await self.hangup(dialog)
                return None
            srtp = LegSrtp(peer_key.key, ours.key)
        assert offer is not None and codec is not None
        if accept is not None and not accept(dialog, offer):
            await self.hangup(dialog)
            return None
        dialog.leg = self._start_leg(
            base or f"dialout-{talkgroup}",
            codec,
            offer.dtmf_type,
            DTMF_TYPE,
            replace(offer, rtcp_mux=False),  # we did not offer rtcp-mux
            talkgroup,
            entry.priority,
            entry,
            srtp=srtp,
            ssrc=ssrc,
            make_port=make_port,
        )
        self.bank.start_sending(dialog.leg.row)
        log.info("dial-out %s connected on %s%s", uri, talkgroup, " with SRTP" if srtp else "")
        return dialog

    def _ack(
        self,
        response: SipMessage,
        uri: str,
        destination: Source,
        call_id: str,
        tag: str,
        local_uri: str,
        via: str,
    ) -> None:
        """ACK a failed INVITE (same branch: it belongs to the INVITE transaction)."""
        to = response.headers.get("To", f"<{uri}>")
        lines = [
            f"ACK {uri} SIP/2.0",
            via,
            "Max-Forwards: 70",
            f"From: {local_uri};tag={tag}",
            f"To: {to}",
            f"Call-ID: {call_id}",
            "CSeq: 1 ACK",
            "Content-Length: 0",
        ]
        self.transport.send("\r\n".join(lines) + "\r\n\r\n", destination)

    async def close(self) -> None:
        self._sweeper.cancel()
        await self.hangup_all()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
