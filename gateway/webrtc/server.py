"""The console's web side: login, static page, state/event WebSocket, WebRTC signalling.

Design: a console is *one peer connection and one engine Port per talkgroup it
joins* (see :mod:`gateway.webrtc.port`). PTT, emergency and who-is-talking travel
on one WebSocket per open page; state is pushed on every floor/talk event (so the
page shows a new talker within a tick plus network time) and ten times a second
for level meters.

Every route except the page's static files answers 401 without a valid session.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import logging
import re
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioice.ice
import numpy as np
from aiohttp import WSMsgType, web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcrtpsender import RTCRtpSender

from gateway.config import PatchConfig
from gateway.engine import Event
from gateway.webrtc.audio import SharedEncoders, silence_packet
from gateway.webrtc.auth import COOKIE, ConsoleAudit, LoginBusy, Session, Sessions
from gateway.webrtc.bank import ConsoleBank
from gateway.webrtc.config import ConsoleConfig, OperatorConfig
from gateway.webrtc.port import ConsolePort
from gateway.webrtc.recall import RecallPort
from gateway.webrtc.rtp import RtpOut

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
HUB: web.AppKey[ConsoleHub] = web.AppKey("console", "ConsoleHub")
STATE_INTERVAL = 0.1  # level meters: ten updates a second
RECEIVE_PREFETCH = 1  # packets aiortc holds before decoding (its default is 4)
PUSH_EVENTS = {"talk_start", "talk_stop", "floor_granted", "preempted", "tot", "patch", "fault"}
PTT_BURST = 20  # PTT presses a page may send at once…
PTT_RATE = 5.0  # …and per second after that; releases always pass (the safe direction)
REFUSAL_AUDIT_SECONDS = 5.0  # rate-limited presses: one audit record this often, counted
MAX_ALARMS = 50  # unacknowledged emergency alarms kept (oldest dropped, audited)
MAX_CONSOLE_PATCHES = 20  # patches made from consoles at once (each is a mix group)
MAX_PATCH_TALKGROUPS = 8
HISTORY_OVERS = 20  # per talkgroup: the last overs shown on its tile
MAX_JSON_DEPTH = 32  # deeper JSON from a client is refused with 400, never a RecursionError
# What the console's own pages may load and where they may connect: their own origin only,
# never framed by another site (clickjacking a PTT button), no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; media-src 'self' blob:; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class Console:
    """One open console page (a browser tab), owned by a session."""

    id: str
    session: Session
    sockets: set[Socket] = field(default_factory=set)
    ports: dict[str, ConsolePort] = field(default_factory=dict)
    pcs: dict[str, RTCPeerConnection] = field(default_factory=dict)
    grace: asyncio.TimerHandle | None = None


@dataclass
class Alarm:
    """An emergency call: raised on every console that monitors the talkgroup until an
    operator acknowledges it (a dispatcher must not miss one because it was short)."""

    id: int
    talkgroup: str
    who: str
    operator: str
    started: float


class Socket:
    """A WebSocket with a coalescing sender: a slow page gets the latest state, not a backlog."""

    def __init__(self, ws: web.WebSocketResponse, session: Session) -> None:
        self.ws = ws
        self.session = session
        self.console: Console | None = None
        self.control: deque[str] = deque(maxlen=100)
        self.state: str | None = None
        self.wake = asyncio.Event()
        self.closing: tuple[int, str] | None = None
        self.tokens = float(PTT_BURST)
        self.refill = time.monotonic()
        self.limited = 0  # presses refused by the rate limit, not yet audited
        self.limited_audit = -1e18
        self.task = asyncio.ensure_future(self._send())

    def may_press(self) -> bool:
        """Token bucket for PTT presses: PTT_BURST at once, PTT_RATE a second after."""
        now = time.monotonic()
        self.tokens = min(float(PTT_BURST), self.tokens + (now - self.refill) * PTT_RATE)
        self.refill = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def send(self, message: dict[str, Any]) -> None:
        self.control.append(json.dumps(message))
        self.wake.set()

    def close_soon(self, code: int, reason: str) -> None:
        """Close after what is queued has been sent (a last 'logged_out' message)."""
        self.closing = (code, reason)
        self.wake.set()

    def send_state(self, text: str) -> None:
        self.state = text
        self.wake.set()

    async def _send(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError, asyncio.CancelledError):
            while not self.ws.closed:
                await self.wake.wait()
                self.wake.clear()
                while self.control:
                    await self.ws.send_str(self.control.popleft())
                if self.closing is not None:
                    code, reason = self.closing
                    await self.ws.close(code=code, message=reason.encode()[:120])
                    return
                if self.state is not None:
                    text, self.state = self.state, None
                    await self.ws.send_str(text)


def offers_stereo(sdp: str) -> bool:
    """True when the page asks for stereo Opus (``stereo=1``): it can be routed to one ear."""
    opus = re.search(r"^a=rtpmap:(\d+) opus/48000/2\s*$", sdp, re.M | re.I)
    if opus is None:
        return False
    fmtp = re.search(rf"^a=fmtp:{opus.group(1)} (.*)$", sdp, re.M)
    return fmtp is not None and "stereo=1" in fmtp.group(1).replace(" ", "").split(";")


def _loopback_only(addresses: list[str]) -> bool:
    try:
        return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    except ValueError:
        return False


def filter_remote_candidates(sdp: str, loopback_only: bool) -> str:
    """Drop remote ICE candidates the gateway must not probe (mDNS names; off-host
    addresses on a loopback-only site), so it never sends to an unintended host."""
    if not loopback_only:
        return sdp
    kept = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            address = parts[4] if len(parts) > 4 else ""
            try:
                if not ipaddress.ip_address(address).is_loopback:
                    continue
            except ValueError:
                continue  # a hostname (mDNS .local): resolving it would multicast
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


def direct_sender(pc: RTCPeerConnection, port: ConsolePort) -> RtpOut | None:
    """The batch-friendly send path for this call, or None to keep aiortc's own."""
    match = re.search(r"^a=rtpmap:(\d+) opus/48000", pc.localDescription.sdp, re.M | re.I)
    senders = [t.sender for t in pc.getTransceivers() if t.kind == "audio"]
    if not match or not senders or not RtpOut.available(senders[0]):
        log.info("console %s: aiortc's sender path (direct RTP not available)", port.name)
        return None
    return RtpOut(senders[0], int(match.group(1)), port.track.samples)


def shorten_receive_buffer(receiver: Any, prefetch: int = RECEIVE_PREFETCH) -> None:
    """aiortc holds 4 packets (80 ms) before decoding the first; on a dispatch LAN one
    is enough, and a shorter hold also clips less of an over when PTT is let go."""
    name = "_RTCRtpReceiver__jitter_buffer"
    if isinstance(getattr(receiver, name, None), JitterBuffer):
        setattr(receiver, name, JitterBuffer(capacity=16, prefetch=prefetch))
    else:  # a future aiortc: keep its default rather than break
        log.debug("aiortc receiver has no jitter buffer attribute; keeping its default")


class ConsoleHub:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.engine = gateway.engine
        self._first_config: ConsoleConfig = gateway.config.section("console")
        self.audit = ConsoleAudit(gateway)
        self.sessions = Sessions(lambda: self.config, self.audit)
        self.consoles: dict[str, Console] = {}
        self.sockets: set[Socket] = set()
        timing = gateway.config.timing
        self.encoders = SharedEncoders(timing.rate, timing.frame, self.config.opus_bitrate)
        self.silence = silence_packet(timing.frame)
        self.bank = ConsoleBank(self.encoders, self.silence, self.engine)
        self._push_pending = False
        self._seats = itertools.count(1)
        self.alarms: dict[int, Alarm] = {}
        self._alarm_ids = itertools.count(1)
        self.ptt_rate_limited = 0
        self.history: dict[str, deque[dict[str, Any]]] = {}
        self.console_patches: dict[str, str] = {}  # patch name → operator who made it
        self._patch_ids = itertools.count(1)
        self.recall: dict[str, RecallPort] = {}  # talkgroups with instant_recall
        self._packets_gone: dict[str, float] = defaultdict(float)  # of seats that left
        self._emergency_overs: set[str] = set()  # ports whose current over is an emergency
        self.sync_recall()
        self.foreign_refused = 0
        self._last_common = ""
        self._loop_task: asyncio.Task | None = None
        # A reload swaps the [console] model; the next tick notices and applies it.
        self._applied = gateway.config.section("console")
        self._apply_pending = False
        self._closed_section = self._first_config.model_copy(update={"operators": {}})
        addresses = self.config.ice_addresses
        if addresses:  # aioice's host-address discovery is process-wide; so is this setting
            aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(addresses)
        self.loopback_only = _loopback_only(addresses)
        self.engine.listeners.append(self._on_event)
        self.engine.before_tick.append(self._check_reload)

    @property
    def config(self) -> ConsoleConfig:
        """The running [console] section; a reload that deletes it leaves no operators."""
        return self.gateway.config.section("console") or self._closed_section

    def stats(self) -> dict[str, float]:
        """For /metrics: sessions, logins, and how much Opus encoding was shared."""
        seats = sum(len(c.ports) for c in self.consoles.values())
        return {
            "console_sessions": float(len(self.sessions.by_token)),
            "console_logins": float(self.sessions.logins),
            "console_login_failures": float(self.sessions.failures),
            "console_login_busy": float(self.sessions.hasher.refused),
            "console_seats": float(seats),
            "console_shared_encodes": float(self.encoders.encodes),
            "console_shared_reuses": float(self.encoders.shares),
            "console_ptt_rate_limited": float(self.ptt_rate_limited),
            "console_foreign_origin": float(self.foreign_refused),
            "console_alarms": float(len(self.alarms)),
            "console_talkgroup_seats": self.seats_by_talkgroup(),
            "console_packets_out": self.packets_by_talkgroup(),
        }

    def packets_by_talkgroup(self) -> dict[str, float]:
        """RTP packets sent to consoles per talkgroup, seats that left included (a counter)."""
        sent = {tg: self._packets_gone.get(tg, 0.0) for tg in self.engine.talkgroups}
        for console in self.consoles.values():
            for tg, port in console.ports.items():
                if tg in sent:
                    sent[tg] += port.stats()["packets_out"]
        return sent

    def seats_by_talkgroup(self) -> dict[tuple[str, str], float]:
        """(talkgroup, listening|talking) → positions: bounded by the config, not by
        how many sessions came and went, and without operator names (those are in
        the audit log, where a supervisor looks up who sat where)."""
        counts = {
            (tg, state): 0.0 for tg in self.engine.talkgroups for state in ("listening", "talking")
        }
        for console in self.consoles.values():
            for tg, port in console.ports.items():
                key = (tg, "talking" if port.talking else "listening")
                if key in counts:
                    counts[key] += 1
        return counts

    # --- lifecycle -------------------------------------------------------------

    async def on_startup(self, app: web.Application) -> None:
        self._loop_task = asyncio.ensure_future(self._state_loop())

    async def on_shutdown(self, app: web.Application) -> None:
        if self._loop_task:
            self._loop_task.cancel()
        self.sessions.hasher.close()
        for console in list(self.consoles.values()):
            await self.close_console(console, "gateway stopping")
        for sock in list(self.sockets):
            await sock.ws.close(code=1001, message=b"gateway stopping")
        with contextlib.suppress(ValueError):
            self.engine.listeners.remove(self._on_event)
        with contextlib.suppress(ValueError):
            self.engine.before_tick.remove(self._check_reload)

    # --- reload: permissions apply live ------------------------------------------

    def _check_reload(self) -> None:
        """Per tick, one identity check; the work runs right after the tick."""
        if self._apply_pending or self.gateway.config.section("console") is self._applied:
            return
        self._apply_pending = True
        asyncio.get_event_loop().call_soon(self.apply_permissions)

    def apply_permissions(self) -> None:
        """Make every session and console seat match the running config, at once.

        A removed operator, or one whose password changed, is logged out and every
        seat of theirs detached; a talkgroup no longer permitted is left; a seat
        turned monitor-only drops PTT (and with it the floor, next tick) and refuses
        PTT from then on. Seats are compared with the config itself, not with the
        previous config, so this is idempotent and a request racing the reload
        cannot leave a seat with rights it lost.
        """
        self._apply_pending = False
        self._applied = self.gateway.config.section("console")
        cfg = self.config
        # A reload keeps console patches while both talkgroups exist (the engine keeps
        # them as run-time patches); one that lost a talkgroup is gone: say so.
        for name in [n for n in self.console_patches if n not in self.engine.runtime_patches]:
            operator = self.console_patches.pop(name)
            self.audit(
                "console_patch_dropped",
                warn=True,
                operator=operator,
                patch=name,
                reason="a talkgroup it joined was removed by a reload",
            )
        self.sync_recall()
        for token, session in list(self.sessions.by_token.items()):
            consoles = [c for c in self.consoles.values() if c.session.token == token]
            reason = self.sessions.invalid_reason(session)
            if reason:
                self.sessions.end(token, reason)
                for console in consoles:
                    self._close_console_now(console, reason)
                for sock in [k for k in self.sockets if k.session.token == token]:
                    sock.send({"type": "logged_out", "reason": reason})
                    sock.close_soon(4001, reason)
                continue
            op = session.config = cfg.operators[session.operator]
            for console in consoles:
                for talkgroup, port in list(console.ports.items()):
                    self._apply_seat(console, session.operator, op, talkgroup, port)
        self.push_state()

    def sync_recall(self) -> None:
        """One recall port per talkgroup whose config asks for instant recall."""
        engine = self.engine
        for talkgroup in list(self.recall):
            port = self.recall[talkgroup]
            cfg = engine.talkgroups.get(talkgroup)
            if cfg is None or cfg.instant_recall <= 0 or port.name not in engine.attached:
                engine.detach(port)  # off, or the talkgroup is gone: its clips go too
                del self.recall[talkgroup]
            else:
                port.keep = cfg.instant_recall
        for talkgroup, cfg in engine.talkgroups.items():
            if cfg.instant_recall > 0 and talkgroup not in self.recall:
                port = RecallPort(talkgroup, cfg.instant_recall, self.gateway.config.timing)
                self.recall[talkgroup] = port
                engine.attach(port, talkgroup)

    def _apply_seat(
        self,
        console: Console,
        operator: str,
        op: OperatorConfig,
        talkgroup: str,
        port: ConsolePort,
    ) -> None:
        if port.name not in self.engine.attached:  # the reload removed the talkgroup
            reason = "talkgroup removed from config"
        elif not op.may_monitor(talkgroup):
            reason = "permission withdrawn"
        else:
            reason = ""
        if reason:
            self.audit(
                "console_permission_changed",
                warn=True,
                operator=operator,
                talkgroup=talkgroup,
                port=port.name,
                mode="none",
            )
            pc = self._drop(console, talkgroup, reason)
            if pc is not None:
                asyncio.ensure_future(pc.close())
            for sock in console.sockets:
                sock.send({"type": "left", "talkgroup": talkgroup, "reason": reason})
            return
        may_talk = op.may_talk(talkgroup)
        if may_talk != port.can_talk:
            self.audit(
                "console_permission_changed",
                warn=not may_talk,
                operator=operator,
                talkgroup=talkgroup,
                port=port.name,
                mode="talk" if may_talk else "monitor",
            )
            if not may_talk and port.ptt:
                self.audit(
                    "console_ptt",
                    operator=operator,
                    talkgroup=talkgroup,
                    on=False,
                    port=port.name,
                    reason="talk permission withdrawn",
                )
                for sock in console.sockets:
                    sock.send(
                        {
                            "type": "refused",
                            "talkgroup": talkgroup,
                            "reason": "talk permission withdrawn",
                        }
                    )
            port.can_talk = may_talk
            port.set_ptt(port.ptt)  # PTT held without the right to talk is dropped now
        if port.emergency and not (op.emergency and may_talk):
            self._set_emergency(port, False, op)
        wanted = op.emergency_priority if port.emergency else op.priority
        if port.priority != wanted:
            self._set_priority(port, wanted)

    def _close_console_now(self, console: Console, reason: str) -> None:
        """Detach every seat of a console in this call; peer connections close after."""
        if console.grace:
            console.grace.cancel()
        for talkgroup in list(console.ports):
            pc = self._drop(console, talkgroup, reason)
            if pc is not None:
                asyncio.ensure_future(pc.close())
        self.consoles.pop(console.id, None)

    # --- state to the pages ----------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if event.kind == "talk_stop" and event.port is not None:
            self._remember_over(event)
        elif event.kind == "talk_start" and event.port not in self.engine.emergency:
            self._emergency_overs.discard(event.port)  # an ordinary over starts
        if event.kind in PUSH_EVENTS and not self._push_pending and self.sockets:
            self._push_pending = True
            # After the tick finishes, so engine.admitted is this tick's.
            asyncio.get_event_loop().call_soon(self._push_now)

    def _remember_over(self, event: Event) -> None:
        """Talk history: the over goes on the tile of every talkgroup that heard it."""
        heard = next((g.talkgroups for g in self.engine.layout.groups if g.name == event.group), ())
        port = next((p for p in self.engine.ports if p.name == event.port), None)
        over = {
            "who": event.talker or event.label or event.port,  # a link: the far side's talker
            "agency": port.config.agency if port is not None else "",
            "start": round(time.time() - event.seconds, 1),
            "seconds": round(event.seconds, 1),
            "emergency": event.port in self._emergency_overs,
        }
        self._emergency_overs.discard(event.port)
        for talkgroup in heard:
            if talkgroup in self.engine.talkgroups:
                overs = self.history.setdefault(talkgroup, deque(maxlen=HISTORY_OVERS))
                overs.appendleft(over)

    def _push_now(self) -> None:
        self._push_pending = False
        self.push_state()

    async def _state_loop(self) -> None:
        while True:
            await asyncio.sleep(STATE_INTERVAL)
            if self.sockets:
                try:
                    self.push_state(only_if_changed=True)
                except Exception:
                    log.exception("console state push failed")

    def push_state(self, only_if_changed: bool = False) -> None:
        """Send every page its view. The periodic push skips when nothing moved
        (no talker, level or floor change), so idle consoles cost nothing."""
        common = self.common_state()
        denied = self.engine.denied
        busy = np.flatnonzero(denied).tolist() if len(denied) == len(self.engine.ports) else []
        digest = json.dumps([common["talkgroups"], busy, list(self.alarms), common["links"]])
        if only_if_changed and digest == self._last_common:
            return
        self._last_common = digest
        for sock in list(self.sockets):
            sock.send_state(json.dumps(self.personal_state(common, sock.session, sock.console)))

    def common_state(self) -> dict[str, Any]:
        eng = self.engine
        lay = eng.layout
        talkers: dict[int, list[dict[str, Any]]] = defaultdict(list)
        level: dict[int, float] = {}
        admitted = eng.admitted if len(eng.admitted) == len(lay.ports) else np.zeros(0, bool)
        for i in np.flatnonzero(admitted).tolist():
            g = int(lay.group_of[i])
            port = lay.ports[i]
            label = port.label
            talkers[g].append(
                {
                    "port": port.name,
                    # A link leg's talker is the far side's (its label, e.g. "RCMP · Marine 7").
                    "who": getattr(port, "talker", "") or label,
                    "label": getattr(port, "talker", "") or label,
                    "agency": port.config.agency,
                    "kind": port.kind,
                    "talkgroup": lay.talkgroup[i],
                    "emergency": bool(getattr(port, "emergency", False)),
                }
            )
            level[g] = max(level.get(g, -120.0), float(eng.rx_dbfs[i]))
        groups = lay.groups
        tg_group = {tg: gi for gi, g in enumerate(groups) for tg in g.talkgroups}
        out: dict[str, Any] = {}
        for name, cfg in eng.talkgroups.items():
            gi = tg_group.get(name)
            group = groups[gi] if gi is not None else None
            out[name] = {
                "name": name,
                "description": cfg.description,
                "floor": group.floor if group else cfg.floor,
                "patched_with": [t for t in group.talkgroups if t != name] if group else [],
                "patches": list(group.patches) if group else [],
                "talkers": talkers.get(gi, []) if gi is not None else [],
                "history": list(self.history.get(name, ())),
                "recall": self.recall[name].listing() if name in self.recall else None,
                "level_dbfs": round(level.get(gi, -120.0), 1) if gi is not None else -120.0,
            }
        return {
            "talkgroups": out,
            "links": self.links_state(),
            "index": {id(p): i for i, p in enumerate(lay.ports)},
        }

    def links_state(self) -> list[dict[str, Any]]:
        """Each cross-border link: its state, round trip and shared talkgroups."""
        service = getattr(self.gateway, "links", None)
        if service is None:
            return []
        out = []
        for name, trunk in service.trunks.items():
            rtt = trunk.rtt()
            shares = [
                {"talkgroup": tg, "as": entry.shared, "state": trunk.names[entry.shared].state}
                for tg, entry in trunk.config.share.items()
                if entry.shared in trunk.names
            ]
            out.append(
                {
                    "name": name,
                    "state": trunk.state(),
                    "shares": shares,
                    "rtt_ms": None if rtt is None else round(rtt * 1000),
                    "cut_here": bool(service.cuts.cuts.get(name)),
                }
            )
        return out

    def personal_state(
        self, common: dict[str, Any], session: Session, console: Console | None
    ) -> dict[str, Any]:
        eng = self.engine
        op = session.config
        tiles = []
        for name, tile in common["talkgroups"].items():
            if not op.may_monitor(name):
                continue
            port = console.ports.get(name) if console else None
            me = "off"
            if port is not None:
                i = common["index"].get(id(port))
                if port.ptt and i is not None and i < len(eng.admitted) and eng.admitted[i]:
                    me = "talking"
                elif port.ptt and i is not None and i < len(eng.denied) and eng.denied[i]:
                    me = "busy"
                elif port.ptt:
                    me = "requesting"
                else:
                    me = "listening"
            may_talk = op.may_talk(name)
            tiles.append(
                {
                    **tile,
                    "may_talk": may_talk,
                    "may_patch": op.patch and may_talk,
                    "may_emergency": op.emergency and may_talk,
                    "me": me,
                }
            )
        alarms = [
            {"id": a.id, "talkgroup": a.talkgroup, "who": a.who, "started": a.started}
            for a in self.alarms.values()
            if op.may_monitor(a.talkgroup)
        ]
        links = [
            {**link, "may_cut": op.links}
            for link in common["links"]
            if op.links or any(op.may_monitor(s["talkgroup"]) for s in link["shares"])
        ]
        return {
            "type": "state",
            "site": self.gateway.config.site.name,
            "server_time": time.time(),
            "talkgroups": tiles,
            "alarms": alarms,
            "links": links,
        }

    # --- consoles, ports and peer connections ------------------------------------

    def console_for(self, session: Session, console_id: str) -> Console:
        console = self.consoles.get(console_id)
        if console is not None and console.session.token != session.token:
            raise web.HTTPForbidden(text="that console id belongs to another session")
        if console is None:
            console = self.consoles[console_id] = Console(console_id, session)
        return console

    async def join(self, session: Session, console: Console, talkgroup: str, offer: dict) -> dict:
        op = session.config
        if talkgroup not in self.engine.talkgroups:
            raise web.HTTPNotFound(text=f"no talkgroup named {talkgroup!r}")
        if not op.may_monitor(talkgroup):
            self.audit(
                "console_join_refused",
                warn=True,
                operator=session.operator,
                talkgroup=talkgroup,
                reason="no permission",
            )
            raise web.HTTPForbidden(text=f"operator {session.operator} may not use {talkgroup}")
        if offer.get("type") != "offer" or not isinstance(offer.get("sdp"), str):
            raise web.HTTPBadRequest(text='expected {"type": "offer", "sdp": "..."}')
        await self.leave(console, talkgroup, "re-joined")
        # One operator may sit at several positions (or reload the page): each console
        # is its own port, named so the audit log tells them apart.
        name = f"{session.operator}@{talkgroup}/{next(self._seats)}"
        cfg = self.config
        timing = self.gateway.config.timing
        port = ConsolePort(
            name,
            timing,
            operator=session.operator,
            display=op.display_name or session.operator,
            agency=op.agency,
            talkgroup=talkgroup,
            may_talk=op.may_talk(talkgroup),
            priority=op.priority,
            encoders=self.encoders,
            silence=self.silence,
            tick=lambda: self.engine.tick_count,
            shared_encode=cfg.shared_encode,
            bank=self.bank,
            dtx=cfg.dtx,
        )
        servers = [RTCIceServer(urls=u) for u in cfg.ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))

        @pc.on("track")
        def _on_track(track: Any) -> None:
            if track.kind == "audio":
                port.start_reading(track)

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            if pc.connectionState in ("failed", "closed") and console.pcs.get(talkgroup) is pc:
                await self.leave(console, talkgroup, f"connection {pc.connectionState}")
                for sock in console.sockets:
                    sock.send({"type": "left", "talkgroup": talkgroup, "reason": "connection lost"})

        try:
            sdp = filter_remote_candidates(offer["sdp"], self.loopback_only)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            pc.addTrack(port.track)
            codecs = RTCRtpSender.getCapabilities("audio").codecs
            opus = [c for c in codecs if c.mimeType == "audio/opus"]
            for transceiver in pc.getTransceivers():
                if transceiver.kind == "audio":
                    transceiver.setCodecPreferences(opus)
                    shorten_receive_buffer(transceiver.receiver)
            await pc.setLocalDescription(await pc.createAnswer())
            if cfg.direct_rtp:
                port.use_direct(direct_sender(pc, port))
        except Exception as exc:
            await pc.close()
            raise web.HTTPBadRequest(text=f"cannot answer this offer: {exc}") from exc
        # A reload or a logout may have landed while the answer was being made.
        op = session.config
        if (
            self.sessions.by_token.get(session.token) is not session
            or self.consoles.get(console.id) is not console
            or talkgroup not in self.engine.talkgroups
            or not op.may_monitor(talkgroup)
        ):
            port.close()
            await pc.close()
            raise web.HTTPForbidden(
                text=f"operator {session.operator} may no longer use {talkgroup}"
            )
        port.can_talk, port.priority = op.may_talk(talkgroup), op.priority
        port.stereo = offers_stereo(offer["sdp"])
        port.set_side(offer.get("side", "both"))
        console.ports[talkgroup] = port
        console.pcs[talkgroup] = pc
        self.engine.attach(port, talkgroup, op.priority)
        self.audit(
            "console_join",
            operator=session.operator,
            talkgroup=talkgroup,
            port=port.name,
            mode="talk" if port.can_talk else "monitor",
        )
        self.push_state()
        return {"type": pc.localDescription.type, "sdp": pc.localDescription.sdp}

    async def leave(self, console: Console, talkgroup: str, reason: str) -> None:
        pc = self._drop(console, talkgroup, reason)
        if pc is not None:
            await pc.close()

    def _drop(self, console: Console, talkgroup: str, reason: str) -> RTCPeerConnection | None:
        """Detach a seat from the engine now; returns its peer connection to close."""
        port = console.ports.pop(talkgroup, None)
        pc = console.pcs.pop(talkgroup, None)
        if port is not None:
            self._packets_gone[talkgroup] += port.stats()["packets_out"]
            self.engine.detach(port)
            port.close()
            self.audit(
                "console_leave",
                operator=port.operator,
                talkgroup=talkgroup,
                port=port.name,
                reason=reason,
            )
            self.push_state()
        return pc

    async def close_console(self, console: Console, reason: str) -> None:
        if console.grace:
            console.grace.cancel()
        for talkgroup in list(console.ports):
            await self.leave(console, talkgroup, reason)
        self.consoles.pop(console.id, None)

    def set_ptt(self, sock: Socket, talkgroup: str, on: bool, emergency: bool = False) -> None:
        console = sock.console
        port = console.ports.get(talkgroup) if console else None
        op = sock.session.config
        if port is None:
            sock.send({"type": "refused", "talkgroup": talkgroup, "reason": "not joined"})
            return
        if on and not port.can_talk:
            self.audit(
                "console_ptt_refused",
                warn=True,
                operator=sock.session.operator,
                talkgroup=talkgroup,
                reason="monitor only",
            )
            sock.send({"type": "refused", "talkgroup": talkgroup, "reason": "monitor only"})
            return
        if on and emergency and not op.emergency:
            self.audit(
                "console_emergency_refused",
                warn=True,
                operator=sock.session.operator,
                talkgroup=talkgroup,
            )
            sock.send(
                {
                    "type": "refused",
                    "talkgroup": talkgroup,
                    "reason": "emergency not permitted for this operator",
                }
            )
            emergency = False
        want_emergency = on and emergency
        if want_emergency != port.emergency:
            self._set_emergency(port, want_emergency, op)
            self.audit(
                "console_emergency",
                warn=True,
                operator=sock.session.operator,
                talkgroup=talkgroup,
                on=want_emergency,
            )
            if want_emergency:
                self.raise_alarm(talkgroup, port)
        if on != port.ptt:
            self.audit(
                "console_ptt",
                operator=sock.session.operator,
                talkgroup=talkgroup,
                port=port.name,
                on=on,
            )
        port.set_ptt(on)

    def set_side(self, sock: Socket, talkgroup: str, side: Any) -> None:
        """Route a talkgroup this page hears to the left ear, the right or both."""
        port = sock.console.ports.get(talkgroup) if sock.console else None
        if port is None or not port.set_side(side):
            reason = "not joined" if port is None else "the page cannot take stereo"
            sock.send({"type": "error", "message": f"cannot route {talkgroup}: {reason}"})

    # --- patching from the console ---------------------------------------------------

    def patch(self, sock: Socket, talkgroups: Any) -> None:
        """Join talkgroups the operator may all talk on into one mix group, for everyone."""
        operator, op = sock.session.operator, sock.session.config
        problem = ""
        if not op.patch:
            problem = "patching not permitted for this operator"
        elif (
            not isinstance(talkgroups, list)
            or not 2 <= len(talkgroups) <= MAX_PATCH_TALKGROUPS
            or not all(isinstance(t, str) for t in talkgroups)
            or len(set(talkgroups)) != len(talkgroups)
        ):
            problem = f"select 2 to {MAX_PATCH_TALKGROUPS} different talkgroups"
        elif any(t not in self.engine.talkgroups or not op.may_talk(t) for t in talkgroups):
            problem = "you may only patch talkgroups you may talk on"
        elif len(self.console_patches) >= MAX_CONSOLE_PATCHES:
            problem = f"at most {MAX_CONSOLE_PATCHES} console patches at once"
        if problem:
            self.audit(
                "console_patch_refused",
                warn=True,
                operator=operator,
                talkgroups=talkgroups if isinstance(talkgroups, list) else None,
                reason=problem,
            )
            sock.send({"type": "patch_refused", "reason": problem})
            return
        name = f"console-{next(self._patch_ids)}"
        while name in self.engine.patches:  # the file may use the name
            name = f"console-{next(self._patch_ids)}"
        self.engine.patches[name] = PatchConfig(
            talkgroups=talkgroups, description=f"made at the console by {operator}"
        )
        self.console_patches[name] = operator
        self.engine.runtime_patches.add(name)
        self.audit("console_patch", operator=operator, patch=name, talkgroups=talkgroups, on=True)
        self.engine.set_patch(name, True)  # the engine's event: audit 'patch', MQTT, pages

    def unpatch(self, sock: Socket, name: Any) -> None:
        """Break an active patch whose talkgroups the operator may all talk on."""
        operator, op = sock.session.operator, sock.session.config
        patch = self.engine.patches.get(name) if isinstance(name, str) else None
        problem = ""
        if not op.patch:
            problem = "patching not permitted for this operator"
        elif patch is None or name not in self.engine.active_patches:
            problem = "no such patch"
        elif not all(op.may_talk(t) for t in patch.talkgroups):
            problem = "you may only unpatch talkgroups you may talk on"
        if problem:
            self.audit(
                "console_patch_refused",
                warn=True,
                operator=operator,
                patch=name if patch is not None else None,
                reason=problem,
            )
            sock.send({"type": "patch_refused", "reason": problem})
            return
        self.audit(
            "console_patch",
            operator=operator,
            patch=name,
            talkgroups=list(patch.talkgroups),
            on=False,
        )
        self.engine.set_patch(name, False)
        if self.console_patches.pop(name, None) is not None:
            self.engine.patches.pop(name, None)  # made here: gone once broken
            self.engine.runtime_patches.discard(name)

    def cut_link(self, sock: Socket, link: Any, cut: bool) -> None:
        """A sovereign cut (or its restore) of a cross-border link, by an operator with
        the ``links`` permission; the links service audits it (``via`` console)."""
        from gateway.links.errors import LinkError

        operator = sock.session.operator
        service = getattr(self.gateway, "links", None)
        problem = ""
        if not sock.session.config.links:
            problem = "cutting links is not permitted for this operator"
        elif service is None or not isinstance(link, str):
            problem = "no such link"
        else:
            try:
                if cut:
                    service.cut(link, None, f"console:{operator}", "cut at the console", "console")
                else:
                    service.restore(link, None, f"console:{operator}", "console")
            except LinkError as exc:
                problem = str(exc)
        if problem:
            self.audit(
                "console_link_refused",
                warn=True,
                operator=operator,
                link=link if isinstance(link, str) else None,
                cut=cut,
                reason=problem,
            )
            sock.send({"type": "link_refused", "reason": problem})
        self.push_state()

    def rate_limited(self, sock: Socket, talkgroup: str) -> None:
        """A PTT press over the page's allowance: refused, counted, audited in batches."""
        self.ptt_rate_limited += 1
        sock.limited += 1
        sock.send({"type": "refused", "talkgroup": talkgroup, "reason": "too many PTT presses"})
        now = time.monotonic()
        if now - sock.limited_audit >= REFUSAL_AUDIT_SECONDS:
            self.audit(
                "console_ptt_rate_limited",
                warn=True,
                operator=sock.session.operator,
                talkgroup=talkgroup,
                refused=sock.limited,
            )
            sock.limited, sock.limited_audit = 0, now

    def _set_emergency(self, port: ConsolePort, on: bool, op: OperatorConfig) -> None:
        """An emergency call pre-empts the floor (priority), and the consoles it pre-empts
        hear it instead of the busy tone (the engine's emergency set)."""
        port.emergency = on
        self._set_priority(port, op.emergency_priority if on else op.priority)
        if on:
            self.engine.emergency.add(port.name)
            self._emergency_overs.add(port.name)  # the over stays marked after release
        else:
            self.engine.emergency.discard(port.name)

    def raise_alarm(self, talkgroup: str, port: ConsolePort) -> None:
        alarm = Alarm(next(self._alarm_ids), talkgroup, port.display, port.operator, time.time())
        self.alarms[alarm.id] = alarm
        while len(self.alarms) > MAX_ALARMS:
            oldest = self.alarms.pop(next(iter(self.alarms)))
            self.audit(
                "console_alarm_dropped", warn=True, alarm=oldest.id, talkgroup=oldest.talkgroup
            )
        self.audit(
            "console_alarm", warn=True, alarm=alarm.id, talkgroup=talkgroup, operator=port.operator
        )

    def acknowledge(self, sock: Socket, alarm_id: Any) -> None:
        """An operator who monitors the alarm's talkgroup silences it for every console."""
        alarm = self.alarms.get(alarm_id) if isinstance(alarm_id, int) else None
        op = sock.session.config
        if alarm is None or not op.may_monitor(alarm.talkgroup):
            sock.send({"type": "error", "message": "no such alarm"})
            return
        del self.alarms[alarm.id]
        self.audit(
            "console_alarm_ack",
            warn=True,
            alarm=alarm.id,
            talkgroup=alarm.talkgroup,
            operator=sock.session.operator,
            seconds=round(time.time() - alarm.started, 1),
        )
        self.push_state()

    def _set_priority(self, port: ConsolePort, priority: int) -> None:
        """Emergency pre-emption: raise a console's floor priority live, keeping the
        floor holder so the engine reports a pre-emption."""
        if port.name in self.engine.attached:
            port.priority = priority
            self.engine.set_priority(port.name, priority)

    def release_console(self, console: Console, reason: str) -> None:
        """The page went away: drop its PTT now, hang up its audio after a grace period."""
        for talkgroup, port in console.ports.items():
            if port.ptt or port.emergency:
                self.audit(
                    "console_ptt",
                    operator=console.session.operator,
                    on=False,
                    talkgroup=talkgroup,
                    port=port.name,
                    reason=reason,
                )
            port.set_ptt(False)
            if port.emergency:
                self._set_emergency(port, False, console.session.config)
        if console.sockets:
            return
        if console.grace:
            console.grace.cancel()
        loop = asyncio.get_event_loop()
        console.grace = loop.call_later(
            self.config.disconnect_grace,
            lambda: asyncio.ensure_future(self._expire(console)),
        )

    async def _expire(self, console: Console) -> None:
        if not console.sockets:
            await self.close_console(console, "page gone")


# --- routes -----------------------------------------------------------------------


def _session(request: web.Request) -> Session:
    hub: ConsoleHub = request.app[HUB]
    session = hub.sessions.get(request.cookies.get(COOKIE))
    if session is None:
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": "log in first"}), content_type="application/json"
        )
    return session


def foreign_origin(request: web.Request) -> bool:
    """True when a browser says the request comes from a page of another site.

    Browsers send ``Origin`` on every WebSocket handshake and POST; a page on another
    site could otherwise open the event socket or log in with the dispatcher's cookie
    behind their back (cross-site WebSocket hijacking). A client without ``Origin`` is
    not a browser and carries no victim's cookie, so it is judged by its session alone.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    return origin != f"{request.scheme}://{request.host}"


def refuse_foreign(request: web.Request) -> None:
    if foreign_origin(request):
        hub: ConsoleHub = request.app[HUB]
        hub.foreign_refused += 1
        raise web.HTTPForbidden(text="this console only answers its own pages (Origin)")


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep the containers nest (iterative: a hostile body cannot blow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(text: str) -> Any:
    """json.loads that answers ValueError, never RecursionError, for absurd nesting."""
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:  # cheap pre-check
        try:
            value = json.loads(text)
        except RecursionError as exc:
            raise ValueError("JSON nested too deeply") from exc
        if json_depth(value) > MAX_JSON_DEPTH:
            raise ValueError("JSON nested too deeply")
        return value
    return json.loads(text)


async def _json(request: web.Request) -> dict[str, Any]:
    refuse_foreign(request)
    if request.content_type != "application/json":
        # A form or text/plain POST is what another site's page can send without a
        # CORS preflight; the console's own page always sends JSON.
        raise web.HTTPUnsupportedMediaType(text="send Content-Type: application/json")
    try:
        body = parse_json(await request.text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(text=f"expected a JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return body


def _console_id(body: dict[str, Any]) -> str:
    cid = body.get("console")
    if not isinstance(cid, str) or not 8 <= len(cid) <= 64 or not cid.isalnum():
        raise web.HTTPBadRequest(text="'console' must be the page's id (8-64 letters/digits)")
    return cid


async def to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/console/")


async def page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def login(request: web.Request) -> web.Response:
    hub: ConsoleHub = request.app[HUB]
    body = await _json(request)
    operator, password = body.get("operator"), body.get("password")
    if not isinstance(operator, str) or not isinstance(password, str):
        raise web.HTTPBadRequest(text='expected {"operator": "...", "password": "..."}')
    try:
        session, retry = await hub.sessions.login(operator, password, request.remote or "?")
    except LoginBusy:
        return web.json_response(
            {"error": "the gateway is busy checking other logins; try again in a second"},
            status=503,
            headers={"Retry-After": "1"},
        )
    if session is None:
        if retry > 0:
            return web.json_response(
                {"error": f"too many failed logins; try again in {retry:.0f} s"},
                status=429,
                headers={"Retry-After": str(int(retry) + 1)},
            )
        return web.json_response({"error": "wrong operator name or password"}, status=401)
    response = web.json_response({"operator": session.operator})
    response.set_cookie(
        COOKIE,
        session.token,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        path="/",
        max_age=int(hub.config.session_lifetime),
    )
    return response


async def logout(request: web.Request) -> web.Response:
    hub: ConsoleHub = request.app[HUB]
    session = _session(request)
    for console in [c for c in hub.consoles.values() if c.session.token == session.token]:
        await hub.close_console(console, "logged out")
    hub.sessions.logout(session.token)
    response = web.json_response({"ok": True})
    response.del_cookie(COOKIE, path="/")
    return response


async def me(request: web.Request) -> web.Response:
    hub: ConsoleHub = request.app[HUB]
    session = _session(request)
    op = session.config
    return web.json_response(
        {
            "operator": session.operator,
            "display": op.display_name or session.operator,
            "agency": op.agency,
            "site": hub.gateway.config.site.name,
            "emergency": op.emergency,
        }
    )


async def state(request: web.Request) -> web.Response:
    hub: ConsoleHub = request.app[HUB]
    session = _session(request)
    return web.json_response(hub.personal_state(hub.common_state(), session, None))


async def recall(request: web.Request) -> web.Response:
    """One instant-recall clip as WAV, for an operator who may monitor the talkgroup."""
    hub: ConsoleHub = request.app[HUB]
    session = _session(request)
    refuse_foreign(request)
    talkgroup = request.query.get("talkgroup", "")
    try:
        clip = int(request.query.get("clip", ""))
    except ValueError as exc:
        raise web.HTTPBadRequest(text="'clip' must be a clip number") from exc
    if not session.config.may_monitor(talkgroup):
        raise web.HTTPForbidden(text=f"operator {session.operator} may not use {talkgroup}")
    port = hub.recall.get(talkgroup)
    found = port.wav(clip) if port is not None else None
    if found is None:
        raise web.HTTPNotFound(text="no such clip (instant recall keeps overs a short while)")
    data, seconds = found
    hub.audit(
        "console_recall",
        operator=session.operator,
        talkgroup=talkgroup,
        clip=clip,
        seconds=round(seconds, 1),
    )
    return web.Response(body=data, content_type="audio/wav", headers={"Cache-Control": "no-store"})


async def join(request: web.Request) -> web.Response:
    hub: ConsoleHub = request.app[HUB]
    session = _session(request)
    body = await _json(request)
    console = hub.console_for(session, _console_id(body))
    talkgroup = body.get("talkgroup")
    if not isinstance(talkgroup, str):
        raise web.HTTPBadRequest(text="'talkgroup' is required")
    return web.json_response(await hub.join(session, console, talkgroup, body))


async def leave(request: web.Request) -> web.Response:
    hub: ConsoleHub = request.app[HUB]
    session = _session(request)
    body = await _json(request)
    console = hub.console_for(session, _console_id(body))
    await hub.leave(console, str(body.get("talkgroup")), "left")
    return web.json_response({"ok": True})


async def events(request: web.Request) -> web.WebSocketResponse:
    hub: ConsoleHub = request.app[HUB]
    refuse_foreign(request)  # 403 before the upgrade: no cross-site WebSocket hijacking
    session = _session(request)  # 401 before the upgrade
    # No permessage-deflate: state messages are small, and deflating each one for
    # every console costs more CPU than the bytes it saves on a LAN.
    ws = web.WebSocketResponse(heartbeat=5.0, compress=False)
    await ws.prepare(request)
    sock = Socket(ws, session)
    hub.sockets.add(sock)
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                data = parse_json(msg.data)
                kind = data["type"]
            except (ValueError, KeyError, TypeError):
                sock.send({"type": "error", "message": "messages are JSON objects with a 'type'"})
                continue
            if hub.sessions.get(session.token) is None:
                sock.send({"type": "error", "message": "session ended; log in again"})
                break
            if kind == "ping":  # the page's heartbeat: a frozen gateway shows within 3 s
                sock.send({"type": "pong"})
            elif kind == "hello":
                try:
                    console = hub.console_for(session, _console_id(data))
                except web.HTTPException as exc:
                    sock.send({"type": "error", "message": exc.text})
                    continue
                if console.grace:
                    console.grace.cancel()
                    console.grace = None
                console.sockets.add(sock)
                sock.console = console
                sock.send({"type": "hello", "joined": list(console.ports)})
                hub.push_state()
            elif kind == "ptt" and isinstance(data.get("talkgroup"), str):
                on, emergency = bool(data.get("on")), bool(data.get("emergency"))
                if on and not sock.may_press():
                    hub.rate_limited(sock, data["talkgroup"])
                    continue
                hub.set_ptt(sock, data["talkgroup"], on, emergency)
                hub.push_state()
            elif kind == "side" and isinstance(data.get("talkgroup"), str):
                hub.set_side(sock, data["talkgroup"], data.get("side"))
            elif kind == "ack":
                hub.acknowledge(sock, data.get("alarm"))
            elif kind == "patch":
                hub.patch(sock, data.get("talkgroups"))
            elif kind == "unpatch":
                hub.unpatch(sock, data.get("patch"))
            elif kind in ("link_cut", "link_restore"):
                hub.cut_link(sock, data.get("link"), kind == "link_cut")
            else:
                sock.send({"type": "error", "message": f"unknown message {kind!r}"})
    finally:
        hub.sockets.discard(sock)
        sock.task.cancel()
        if sock.console is not None:
            sock.console.sockets.discard(sock)
            hub.release_console(sock.console, "event socket closed")
    return ws


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every console response says: load only from here, never inside another site's frame."""
    if request.path.startswith(("/console", "/api/console")):
        response.headers.update(SECURITY_HEADERS)


def install(app: web.Application, gateway: Gateway) -> None:
    """Serve the console (the site has a ``[console]`` section)."""
    hub = ConsoleHub(gateway)
    app[HUB] = hub
    app.on_response_prepare.append(security_headers)
    gateway.console = hub  # type: ignore[attr-defined]
    app.on_startup.append(hub.on_startup)
    app.on_shutdown.append(hub.on_shutdown)
    app.router.add_get("/console", to_console)
    app.router.add_get("/console/", page)
    app.router.add_static("/console/static/", STATIC)
    app.router.add_post("/api/console/login", login)
    app.router.add_post("/api/console/logout", logout)
    app.router.add_get("/api/console/me", me)
    app.router.add_get("/api/console/state", state)
    app.router.add_post("/api/console/join", join)
    app.router.add_post("/api/console/leave", leave)
    app.router.add_get("/api/console/events", events)
    app.router.add_get("/api/console/recall", recall)


def new_console_id() -> str:
    return secrets.token_hex(8)
