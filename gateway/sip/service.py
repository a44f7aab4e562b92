"""The SIP service: starts with the gateway, stops with it (BYE to every call, unregister).

It owns the pieces and wires them to the engine's clock: the leg bank receives
every call's audio just before each tick and sends it just after, so SIP media
runs on the engine's clock and nothing else paces it.

A reload changes what SIP does, never where it listens: routes, accounts,
dial-outs, limits, timers and the TLS certificate, key and trust apply at once
(:meth:`SipService.reconfigure`; a certificate renewed in place is read again on
every reload, and new TLS connections use it while open ones keep theirs); a
new listen address, media port range or public address is refused with "restart
the gateway" (:meth:`SipService.refuse_reload`), because every call's dialog and
media are bound to the sockets it started on. A reload that
deletes ``[sip]`` ends every call, registration and dial-out; the socket stays
open (answering 404) until the next restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from gateway.config import Model, SiteConfig
from gateway.sip.bank import ROUTE_COUNTERS, LegBank
from gateway.sip.calls import CallManager
from gateway.sip.config import AccountConfig, SipConfig, split_hostport
from gateway.sip.dialout import DialOut
from gateway.sip.message import SipMessage
from gateway.sip.registration import Registration
from gateway.sip.stream import Limits, TlsFiles
from gateway.sip.tls import expiry_days, load_certificate
from gateway.sip.transport import SipTransport

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)


class _Runner(Protocol):
    """A registration or a dial-out: started once, stopped once."""

    def start(self) -> None: ...

    def stop(self) -> Awaitable[None]: ...


def install_tick_hooks(
    gateway: Gateway, before: Callable[[], None], after: Callable[[], None]
) -> Callable[[], None]:
    """Run ``before``/``after`` around every engine tick; returns the uninstaller.

    Uses ``engine.before_tick``/``after_tick`` lists when the engine has them;
    otherwise wraps the media clock's tick callback (the one seam that exists).
    """
    engine = gateway.engine
    hooks_before = getattr(engine, "before_tick", None)
    hooks_after = getattr(engine, "after_tick", None)
    if isinstance(hooks_before, list) and isinstance(hooks_after, list):
        hooks_before.append(before)
        hooks_after.append(after)

        def uninstall_lists() -> None:
            with contextlib.suppress(ValueError):
                hooks_before.remove(before)
                hooks_after.remove(after)

        return uninstall_lists
    clock = gateway.clock
    inner = clock.on_tick

    def tick() -> None:
        before()
        try:
            inner()
        finally:
            after()

    clock.on_tick = tick

    def uninstall_wrapper() -> None:
        clock.on_tick = inner

    return uninstall_wrapper


def _guarded(name: str, step: Callable[[], None]) -> Callable[[], None]:
    """A media step that fails must not stop the engine's tick; log it (once a second at most)."""
    last = [0.0]

    def run() -> None:
        try:
            step()
        except Exception:
            loop_time = asyncio.get_event_loop().time()
            if loop_time - last[0] > 1.0:
                last[0] = loop_time
                log.exception("SIP media %s failed", name)

    return run


class SipService:
    def __init__(self, gateway: Gateway, config: SipConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.bank: LegBank | None = None  # opened in start(): it binds the media sockets
        self.transport = SipTransport(self._on_request)
        self.calls: CallManager | None = None
        self.registrations: dict[str, Registration] = {}
        self.dial_outs: dict[str, DialOut] = {}
        self._uninstall: Callable[[], None] | None = None
        self._blas_limit = None
        self._certificate = None  # the site's TLS certificate, for its expiry metric
        self._tasks: set[asyncio.Task] = set()  # reload work: unregister, redial, ...

    def _on_request(self, message: SipMessage) -> None:
        if self.calls is not None:
            self.calls.on_request(message)

    def _audit(self, event: str, **fields: object) -> None:
        """A SIP record in the site's audit log (when there is one): calls, PIN, auth."""
        audit = getattr(self.gateway, "audit", None)
        if audit is not None and hasattr(audit, "record"):
            audit.record(event, **fields)

    @property
    def port(self) -> int:
        return self.transport.port

    async def start(self) -> None:
        problems = self.config.check_talkgroups(list(self.gateway.config.talkgroups))
        if problems:
            raise ValueError("[sip] refers to missing talkgroups:\n  " + "\n  ".join(problems))
        self._limit_blas()
        host, port = split_hostport(self.config.listen)
        await self.transport.open(host, port)
        await self._open_streams()
        address = self.config.public_address or self.transport.host
        timing = self.gateway.config.timing
        self.bank = LegBank(
            timing.rate,
            timing.frame_samples,
            timing.frame,
            host=self.transport.host,
            port_range=self.config.rtp_range,
            rtcp_interval=self.config.rtcp_interval,
            late_by=self.gateway.clock.late_by,
        )
        self.calls = CallManager(
            self.config, self.transport, self.gateway.engine, timing, self.bank, address
        )
        self.calls.audit = self._audit
        self._uninstall = install_tick_hooks(
            self.gateway, _guarded("receive", self.bank.receive), _guarded("send", self.bank.send)
        )
        self._address = address
        for name, account in self.config.accounts.items():
            self.registrations[name] = self._registration(name, account)
            self.registrations[name].start()
        for name, entry in self.config.dial_out.items():
            self.dial_outs[name] = DialOut(name, entry, self.calls, self.gateway.engine)
            self.dial_outs[name].start()
        streams = self.transport.streams.ports
        log.info(
            "SIP on %s (%d accounts, %d routes, %d dial-outs)",
            ", ".join(
                f"{kind}:{address}:{port}" for kind, port in (("udp", self.port), *streams.items())
            ),
            len(self.registrations),
            len(self.config.routes),
            len(self.dial_outs),
        )

    async def _open_streams(self) -> None:
        """TCP/TLS listeners, with the caps on what strangers may open and send."""
        config = self.config
        limits = _limits(config)
        files = _tls_files(config)
        if config.tls_certificate is not None:
            self._certificate = load_certificate(config.tls_certificate)
        listen = {}
        for kind, where in (("tcp", config.listen_tcp), ("tls", config.listen_tls)):
            if where:
                listen[kind] = split_hostport(where)
        await self.transport.open_streams(limits, files, listen)

    def _registration(self, name: str, account: AccountConfig) -> Registration:
        return Registration(
            name, account, self.transport, self._address, self.config.transaction_timeout
        )

    # --- reload ------------------------------------------------------------------------

    def refuse_reload(self, new: SiteConfig) -> str:
        """Why ``new`` needs a restart ("" when it does not): the sockets stay as started."""
        sip = new.section("sip")
        moved = self.config.listener_changes(sip) if sip is not None else []
        if moved:
            return f"[sip] {', '.join(moved)} changed: SIP sockets move only at a restart"
        if sip is not None:
            try:  # the files may have changed on disk since the config was checked
                _tls_files(sip).contexts()
            except (OSError, ValueError) as exc:
                return f"[sip] TLS files do not load: {exc}"
        return ""

    def reconfigure(self, new: SiteConfig) -> None:
        """Routes, accounts, dial-outs, limits and timers of ``new``, from now on.

        Runs between two ticks, after the engine took the new talkgroups. New calls
        are routed by the new config at once (the call manager reads it per call).
        Calls on an unchanged route are not touched; on a removed route, or one whose
        talkgroup or callers changed, they get BYE; calls on a route whose other
        terms changed (VOX, PTT keys, priority, TOT) keep the terms they were answered
        with. Accounts and dial-outs that are new start, removed ones stop
        (unregister, BYE), changed ones restart.
        """
        old = self.config
        if new.section("sip") is not None:
            self._reload_tls(new.section("sip"))
        sip = new.section("sip") or old.model_copy(
            update={"routes": {}, "accounts": {}, "dial_out": {}}
        )
        if sip == old or self.calls is None or self.bank is None:
            return
        self.config = self.calls.config = sip
        self.bank.rtcp.rtcp_ticks = max(1, round(sip.rtcp_interval / self.bank.frame_seconds))
        self.transport.streams.limits = _limits(sip)  # read per connection and per check
        for registration in self.registrations.values():
            registration.timeout = sip.transaction_timeout
        for dialog in list(self.calls.dialogs.values()):
            if not dialog.incoming or not dialog.route:
                continue  # a dial-out's call goes with its dial-out (below), a link's with it
            route, before = sip.routes.get(dialog.route), old.routes.get(dialog.route)
            if route is None:
                self.calls.hang_up_soon(dialog, f"route {dialog.route} was removed")
            elif before is not None and not route.keeps_calls_of(before):
                self.calls.hang_up_soon(
                    dialog, f"route {dialog.route} changed its talkgroup or callers"
                )
        calls, engine = self.calls, self.gateway.engine
        self._follow(old.accounts, sip.accounts, self.registrations, self._registration)
        self._follow(
            old.dial_out,
            sip.dial_out,
            self.dial_outs,
            lambda name, entry: DialOut(name, entry, calls, engine),
        )

    def _reload_tls(self, sip: SipConfig) -> None:
        """Read the TLS certificate, key, CA and pins again (renewed in place or moved):
        new connections use them, open ones keep what they were set up with."""
        streams = self.transport.streams
        files = _tls_files(sip)
        if streams is None or (files == streams.tls and files.certificate is None):
            return
        streams.use_tls(files)
        self._certificate = load_certificate(files.certificate) if files.certificate else None
        log.info("SIP TLS certificate and trust read again; open connections keep theirs")

    def _follow(
        self,
        old: Mapping[str, Model],
        new: Mapping[str, Model],
        running: dict,
        make: Callable[[str, Any], _Runner],
    ) -> None:
        """Start what is new, stop what is gone, restart what changed (old one stopped first:
        an account re-registering must not have its new binding removed by the old one)."""
        for name in [n for n in old if n not in new or new[n] != old[n]]:
            runner = running.pop(name)
            successor = None
            if name in new:
                successor = running[name] = make(name, new[name])
            self._spawn(_replace(runner, successor))
        for name in [n for n in new if n not in old]:
            running[name] = make(name, new[name])
            running[name].start()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> dict[str, object]:
        """For metrics: per-account registration state, and the signalling counters."""
        calls = self.calls
        return {
            "sip_registered": {
                n: float(r.registered.is_set()) for n, r in self.registrations.items()
            },
            "sip_registration_failures": {
                n: float(r.failures) for n, r in self.registrations.items()
            },
            "sip_calls_active": len(calls.dialogs) if calls else 0,
            "sip_calls_total": calls.calls_total if calls else 0,
            # A 401 is a challenge on the way to a call, not a refusal: counted by code only.
            "sip_calls_rejected": (
                sum(n for code, n in calls.rejected.items() if code != 401) if calls else 0
            ),
            "sip_calls_refused": {str(c): n for c, n in calls.rejected.items()} if calls else {},
            "sip_sources_backed_off": calls.admission.backed_off() if calls else 0,
            "sip_calls_srtp": self.bank.table.srtp_legs if self.bank else 0,
            "sip_messages_malformed": self.transport.stats.malformed,
            "sip_connections": len(self.transport.streams.connections),
            "sip_connections_refused": self.transport.streams.stats.connections_refused,
            "sip_tls_handshake_failures": self.transport.streams.stats.handshake_failures,
            **(
                {"sip_tls_certificate_expiry_days": expiry_days(self._certificate)}
                if self._certificate is not None
                else {}
            ),
            "sip_calls_timed_out": dict(calls.timed_out) if calls else {},
            "sip_messages_failed": self.transport.stats.errors,
            # RTP/RTCP dropped, by kind (truncated, huge, version, layout, payload_type, ...)
            "sip_rtp_malformed": dict(self.bank.table.malformed) if self.bank else {},
            "sip_routes": self.route_stats(),
        }

    def route_stats(self) -> dict[tuple[str, str], dict[str, float]]:
        """Media figures per (route, talkgroup), for metrics: every configured route and
        dial-out (zeros before its first call), and any that had calls before a reload."""
        report = self.bank.route_stats() if self.bank else {}
        configured = [(name, r.talkgroup) for name, r in self.config.routes.items()]
        configured += [
            (f"dialout-{d.talkgroup}", d.talkgroup) for d in self.config.dial_out.values()
        ]
        for group in configured:
            report.setdefault(group, dict.fromkeys(ROUTE_COUNTERS, 0.0))
        return report

    def _limit_blas(self) -> None:
        """One BLAS thread: the bank's matrix products are small, and a 2-core box running
        the media clock loses ticks when OpenBLAS spins up threads for them."""
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - a dependency, but the gateway still runs
            return
        self._blas_limit = threadpool_limits(limits=1, user_api="blas")

    async def stop(self) -> None:
        for task in list(self._tasks):  # a reload's restarts: what they started is below
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for dial_out in self.dial_outs.values():
            await dial_out.stop()
        if self.calls is not None:
            await self.calls.close()
        for registration in self.registrations.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(registration.stop(), 0.15)
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None
        self.transport.close()
        await self.transport.streams.close()
        if self.bank is not None:
            self.bank.close()


async def _replace(old: _Runner, new: _Runner | None) -> None:
    await old.stop()
    if new is not None:
        new.start()


def _limits(config: SipConfig) -> Limits:
    """The caps on TCP/TLS connections strangers may open and what they may send."""
    return Limits(
        max_message=config.max_message_bytes,
        max_header=config.max_header_bytes,
        idle_timeout=config.connection_idle_timeout,
        message_timeout=config.message_timeout,
        handshake_timeout=config.tls_handshake_timeout,
        max_connections=config.max_connections,
        max_per_address=config.max_connections_per_address,
        rate_per_address=config.max_connection_rate_per_address,
    )


def _tls_files(config: SipConfig) -> TlsFiles:
    return TlsFiles(
        config.tls_certificate, config.tls_key, config.tls_ca, frozenset(config.tls_pins)
    )
