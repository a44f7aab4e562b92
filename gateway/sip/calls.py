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
(``sip-6001#3``): the audit log is where a caller is named.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.config import Timing
from gateway.engine import Engine
from gateway.sip.admission import Admission, Refusal
from gateway.sip.bank import LegBank, LegMedia
from gateway.sip.config import (
    DialOutConfig,
    RouteConfig,
    SipConfig,
    SrtpPolicy,
    strictest,
)
from gateway.sip.leg import SipLeg, leg_config
from gateway.sip.pin import gate_call
from gateway.sip.pyvoip import SIPMessage
from gateway.sip.rtcp import RtcpState
from gateway.sip.rtp import CODEC_NAMES
from gateway.sip.sdp import (
    AVP,
    DTMF_TYPE,
    NAMES,
    SAVP,
    MediaOffer,
    choose_codec,
    describe,
    read_offer,
)
from gateway.sip.srtp import LegSrtp, accept_keys, new_crypto
from gateway.sip.transport import (
    T1,
    Address,
    SipTransport,
    Source,
    as_source,
    new_call_id,
    new_tag,
    raw_headers,
    uri_source,
)

log = logging.getLogger(__name__)

_URI = re.compile(r"^sips?:(?:(?P<user>[^@;>]+)@)?(?P<host>[^:;>]+)(?::(?P<port>\d+))?")
_ANGLE = re.compile(r"<([^>]+)>")


def uri_user(uri: str) -> str:
    match = _URI.match(uri.strip("<> "))
    return match["user"] or "" if match else ""


def contact_uri(value: str) -> str:
    match = _ANGLE.search(value)
    return (match.group(1) if match else value.split(";")[0]).strip()


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
    answer: bytes = b""  # our 200 OK, resent on INVITE retransmissions until ACK
    acked: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)


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
        self.calls_total = 0
        self._names = 0
        self._tasks: set[asyncio.Task] = set()
        self.admission = Admission(lambda: self.config, lambda: len(self.dialogs), self._calls_from)
        # The site's audit log (set by the service): record(event, **fields).
        self.audit: Callable[..., Any] = lambda event, **fields: None

    def _calls_from(self, host: str) -> int:
        return sum(1 for d in self.dialogs.values() if d.incoming and d.peer.address[0] == host)

    def contact_for(self, peer: Source) -> str:
        """Our Contact in a dialog with ``peer``: over the transport the dialog uses."""
        return self.transport.contact(self.config.user, self.address, peer)

    # --- requests from the network ---------------------------------------------------

    def on_request(self, message: SIPMessage, raw: bytes, source: Source) -> None:
        method = message.method
        if method == "INVITE":
            self._invite(message, raw, source)
        elif method == "ACK":
            dialog = self.dialogs.get(message.headers["Call-ID"])
            if dialog is not None:
                dialog.acked = True
        elif method == "BYE":
            dialog = self.dialogs.get(message.headers["Call-ID"])
            if dialog is None:
                self.transport.respond(raw, source, 481, "Call/Transaction Does Not Exist")
                return
            self.transport.respond(raw, source, 200, "OK")
            log.info(
                "call %s ended by the far end", dialog.leg.name if dialog.leg else dialog.call_id
            )
            self._end(dialog)
        elif method == "CANCEL":
            # We answer INVITEs at once, so there is never a pending one to cancel.
            known = message.headers["Call-ID"] in self.dialogs
            if known:
                self.transport.respond(raw, source, 200, "OK")
            else:
                self.transport.respond(raw, source, 481, "Call/Transaction Does Not Exist")
        elif method == "OPTIONS":
            self.transport.respond(
                raw,
                source,
                200,
                "OK",
                headers=[
                    "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS",
                    "Accept: application/sdp",
                ],
            )

    def _reject(
        self,
        raw: bytes,
        source: Source,
        code: int,
        reason: str,
        why: str,
        headers: tuple[str, ...] = (),
    ) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1
        self.admission.refusals(source.address[0], code, reason, why)
        self.transport.respond(raw, source, code, reason, to_tag=new_tag(), headers=[*headers])

    def _refuse(self, raw: bytes, source: Source, refusal: Refusal, route: str = "") -> None:
        if refusal.audit:
            self.audit(refusal.audit, route=route, source=source.address[0], reason=refusal.why)
        self._reject(raw, source, refusal.code, refusal.reason, refusal.why, refusal.headers)

    def _invite(self, message: SIPMessage, raw: bytes, source: Source) -> None:
        call_id = message.headers["Call-ID"]
        existing = self.dialogs.get(call_id)
        if existing is not None:  # retransmission or re-INVITE: same answer (no media change)
            if existing.answer:
                self.transport.send(existing.answer, source)
            return
        limited = self.admission.limit(source)
        if limited is not None:
            self._refuse(raw, source, limited)
            return
        request_uri = message.heading.split(b" ")[1].decode("utf-8", "replace")
        number = uri_user(request_uri) or (message.headers["To"].get("number") or "")
        found = self.config.route_for(number)
        if found is None and message.headers["To"].get("number"):
            found = self.config.route_for(message.headers["To"]["number"])
        if found is None:
            self._reject(raw, source, 404, "Not Found", f"no route for number {number!r}")
            return
        name, route = found
        admitted = self.admission.identify(name, route, source, "INVITE", call_id, raw_headers(raw))
        if isinstance(admitted, Refusal):
            self._refuse(raw, source, admitted, name)
            return
        offer = read_offer(message)
        codec = choose_codec(offer, self.config.codecs) if offer else None
        if offer is None or codec is None:
            self._reject(raw, source, 488, "Not Acceptable Here", "no G.711 in the offer")
            return
        policy = self._srtp_policy(route, request_uri, source)
        peer_key, refusal = accept_keys(policy, source.transport, offer.savp, offer.crypto)
        if refusal:
            self._reject(raw, source, 488, "Not Acceptable Here", f"route {name}: {refusal}")
            return
        if route.talkgroup not in self.engine.talkgroups:
            self._reject(
                raw,
                source,
                480,
                "Temporarily Unavailable",
                f"talkgroup {route.talkgroup!r} is not running",
            )
            return
        headers = dict(raw_headers(raw))
        tag = new_tag()
        dialog = Dialog(
            call_id=call_id,
            local_tag=tag,
            remote_tag=message.headers["From"]["tag"],
            local_uri=headers.get("To", ""),
            remote_uri=headers.get("From", "").split(";tag=")[0],
            target=contact_uri(headers.get("Contact", "")) or request_uri,
            peer=source,
            incoming=True,
            route=name,
        )
        dtmf = DTMF_TYPE if offer.dtmf_type is not None else None
        dtmf_in = offer.dtmf_type
        pin = gate_call(self, dialog, name, route) if route.pin else None
        ours = new_crypto(peer_key.tag) if peer_key else None
        leg = self._start_leg(
            f"sip-{name}", codec, dtmf_in, dtmf, offer, route.talkgroup, route.priority, route,
            on_pin=pin.press if pin else None,
            srtp=LegSrtp(peer_key.key, ours.key) if peer_key and ours else None,
        )  # fmt: skip
        dialog.leg = leg
        self.dialogs[call_id] = dialog
        body = describe(
            self.address,
            self.bank.port,
            [codec],
            dtmf_in,
            rtcp_mux=offer.rtcp_mux,
            profile=offer.profile if ours else AVP,
            crypto=ours,
        )
        dialog.answer = self.transport.respond(
            raw,
            source,
            200,
            "OK",
            to_tag=tag,
            headers=[f"Contact: {self.contact_for(source)}"],
            body=body,
        )
        self._spawn(self._resend_until_ack(dialog, source))
        log.info(
            "call %s answered: %s%s on %s",
            leg.name,
            CODEC_NAMES[codec],
            " with SRTP" if ours else "",
            route.talkgroup,
        )
        self.audit(
            "sip_call", port=leg.name, route=name, talkgroup=route.talkgroup,
            caller=admitted.identity, auth=admitted.how, source=source.address[0],
            pin="required" if pin else None, srtp=bool(ours),
        )  # fmt: skip

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

    async def _resend_until_ack(self, dialog: Dialog, source: Source) -> None:
        interval = T1
        for _ in range(7):
            await asyncio.sleep(interval)
            if dialog.acked or dialog.ended.is_set():
                return
            self.transport.send(dialog.answer, source)
            interval = min(interval * 2, 4.0)

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
    ) -> SipLeg:
        """Put a call's media in the bank and its Port on the engine (loop thread only).

        With ``on_pin`` the leg starts muted both ways (the bank's ``muted`` column)
        and its key presses go to ``on_pin`` until that unmutes it."""
        self._names += 1
        self.calls_total += 1
        name = f"{base}#{self._names}"
        route_name = base.removeprefix("sip-")  # what metrics count the call under
        rtcp_port = offer.rtcp_port if offer.rtcp_port is not None else offer.port + 1
        media = LegMedia(
            payload_type=codec,
            dtmf_type=dtmf_in,
            remote=(offer.address, offer.port),
            rtcp=RtcpState((offer.address, rtcp_port), mux=offer.rtcp_mux),
            srtp=srtp,
            group=(route_name, talkgroup),
        )
        media.dtmf_type = dtmf_in if dtmf_in is not None else dtmf_out
        row = self.bank.add(media)
        bank = self.bank
        bank.vox[row] = route.ptt == "vox"
        bank.vox_threshold[row] = route.vox_threshold_dbfs
        bank.vox_hang[row] = round(route.vox_hang / self.timing.frame)
        bank.muted[row] = on_pin is not None
        talk_key = getattr(route, "dtmf_talk", "*")
        release_key = getattr(route, "dtmf_release", "#")

        def on_dtmf(digit: str, pressed: bool) -> None:
            if not pressed:
                return
            if bank.muted[row]:
                if on_pin is not None:
                    on_pin(digit)
                return
            if route.ptt == "dtmf":
                if digit == talk_key:
                    bank.ptt[row] = True
                elif digit == release_key:
                    bank.ptt[row] = False

        media.on_dtmf = on_dtmf
        leg = SipLeg(
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

    def _in_dialog(self, dialog: Dialog, method: str, cseq: int | None = None) -> str:
        """An in-dialog request; a new CSeq unless given (an ACK to 2xx reuses the INVITE's)."""
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
            "Content-Length: 0",
        ]
        return "\r\n".join(lines) + "\r\n\r\n"

    async def hangup(self, dialog: Dialog, wait: float = 2.0) -> None:
        """Send BYE and end the leg now (the media stops even if the BYE gets no answer)."""
        if dialog.call_id not in self.dialogs:
            return
        bye = self._in_dialog(dialog, "BYE")
        self._end(dialog)
        await self.transport.request(bye, dialog.peer, wait)

    async def hangup_all(self, wait: float = 0.4) -> None:
        dialogs = list(self.dialogs.values())
        if dialogs:
            await asyncio.gather(*(self.hangup(d, wait) for d in dialogs), return_exceptions=True)

    async def dial(
        self,
        uri: str,
        talkgroup: str,
        entry: DialOutConfig,
        proxy: Address | None = None,
        offer_srtp: bool = True,
    ) -> Dialog | None:
        """Call out (a dial-out patch); the answered call's Dialog, or None.

        Over TLS the offer is SRTP (RTP/SAVP with our key) unless the policy is off; under
        ``optional`` a far end that refuses it with 488 is called again with plain RTP."""
        destination = as_source(proxy) if proxy else uri_source(uri)
        if destination is None:
            log.warning("dial-out to %s: not a URI the gateway can call", uri)
            return None
        codecs = [NAMES[c] for c in self.config.codecs]
        policy = getattr(entry, "srtp", "optional")
        if policy == "required" and not destination.secure:
            log.warning("dial-out to %s: SRTP required but the call would not go over TLS", uri)
            return None
        ours = new_crypto() if destination.secure and policy != "off" and offer_srtp else None
        body = describe(
            self.address,
            self.bank.port,
            codecs,
            DTMF_TYPE,
            profile=SAVP if ours else AVP,
            crypto=ours,
        )
        call_id = new_call_id(self.address)
        tag = new_tag()
        local_uri = f"<sip:{self.config.user}@{self.address}>"
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
        if response is None or int(response.status) >= 300:
            if response is not None:
                self._ack(response, uri, destination, call_id, tag, local_uri, invite_lines[1])
                if int(response.status) == 488 and ours is not None and policy == "optional":
                    log.info("dial-out to %s refused SRTP; calling again with plain RTP", uri)
                    return await self.dial(uri, talkgroup, entry, proxy, offer_srtp=False)
            log.warning(
                "dial-out to %s failed: %s",
                uri,
                "no answer" if response is None else f"{int(response.status)}",
            )
            return None
        headers = dict(raw_headers(response.raw))
        offer = read_offer(response)
        codec = choose_codec(offer, self.config.codecs) if offer else None
        dialog = Dialog(
            call_id=call_id,
            local_tag=tag,
            remote_tag=response.headers["To"]["tag"],
            local_uri=local_uri,
            remote_uri=f"<{uri}>",
            target=contact_uri(headers.get("Contact", "")) or uri,
            peer=destination,
            incoming=False,
        )
        self.dialogs[call_id] = dialog
        self.transport.send(self._in_dialog(dialog, "ACK", cseq=1), destination)
        dialog.acked = True
        if offer is None or codec is None:
            log.warning("dial-out to %s: answer has no usable G.711; hanging up", uri)
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
        dialog.leg = self._start_leg(
            f"dialout-{talkgroup}",
            codec,
            offer.dtmf_type,
            DTMF_TYPE,
            replace(offer, rtcp_mux=False),  # we did not offer rtcp-mux
            talkgroup,
            entry.priority,
            entry,
            srtp=srtp,
        )
        log.info("dial-out %s connected on %s%s", uri, talkgroup, " with SRTP" if srtp else "")
        return dialog

    def _ack(
        self,
        response: SIPMessage,
        uri: str,
        destination: Source,
        call_id: str,
        tag: str,
        local_uri: str,
        via: str,
    ) -> None:
        """ACK a failed INVITE (same branch: it belongs to the INVITE transaction)."""
        to = dict(raw_headers(response.raw)).get("To", f"<{uri}>")
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
        await self.hangup_all()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def by_leg(self) -> dict[str, Dialog]:
        return {d.leg.name: d for d in self.dialogs.values() if d.leg is not None}
