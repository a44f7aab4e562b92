"""The site: builds ports from config, runs the clock, reloads, and shuts down safely.

Whatever way the gateway stops (Ctrl-C, SIGTERM, a bug in a tick), every
transmitter is unkeyed and every port closed on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gateway.clock import MediaClock
from gateway.config import (
    ConfigError,
    PatchConfig,
    PortConfig,
    SiteConfig,
    describe_changes,
    load_config,
)
from gateway.endpoints import Endpoint, load
from gateway.engine import RETRY_FIRST_S, RETRY_MAX_S, Engine, Event
from gateway.ports import DownPort, Port, build_port

log = logging.getLogger(__name__)
SERVICE_STOP_SECONDS = 2.0  # each service's stop at shutdown (BYEs, unregistering, closing)


class Service(Protocol):
    """Something that runs beside the engine: web console, SIP stack, MQTT, metrics.

    A service whose section can change live also has (both optional, both called
    on the event loop):

    - ``refuse_reload(new: SiteConfig) -> str``: why ``new`` cannot be applied
      without a restart, "" when it can. Asked before anything changes, so a
      refused reload leaves the whole running config in force.
    - ``reconfigure(new: SiteConfig) -> None``: make the service match ``new``;
      called between two ticks, right after the engine took the new ports and
      talkgroups. Must not block: slow work (BYE, REGISTER) goes in tasks.
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class ReloadResult:
    ok: bool
    added: list[str]  # ports
    removed: list[str]
    changed: list[str]
    error: str = ""
    changes: list[str] = field(default_factory=list)  # the rest: "sip: routes +7001 -6001"

    @property
    def summary(self) -> str:
        """``ports +d ~c; sip: routes +7001 -6001, accounts ~marine`` (the log line's)."""
        ports = [f"+{n}" for n in self.added] + [f"-{n}" for n in self.removed]
        ports += [f"~{n}" for n in self.changed]
        parts = ([f"ports {' '.join(ports)}"] if ports else []) + self.changes
        return "; ".join(parts) or "nothing changed"


class Gateway:
    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.engine = Engine(config.timing)
        self.clock = MediaClock(config.timing.frame, lambda: self.engine.tick(self.clock.due))
        self.ports: dict[str, Port] = {}
        self.services: list[Service] = []
        # Set to their services when the config has the section (see _build_service).
        self.web = self.sip = self.mqtt = self.audit = self.links = None
        self.sections_off: set[str] = set()  # sections absent at start: their service is off
        self._stop = asyncio.Event()
        self._reloading = asyncio.Lock()  # one live reload at a time
        self._reloads: set[asyncio.Task] = set()
        self.reload_failures = 0  # borderlink_reload_failures_total
        self.down: dict[str, _Retry] = {}  # ports that could not start, retried with backoff
        self.engine.listeners.append(_log_event)
        for name, port_config in config.ports.items():
            if port_config.enabled:
                self.ports[name] = self._start_port(name, port_config)
        self.engine.configure(self.ports.values(), config.talkgroups, config.patches)

    def note(self, event: str, **fields: object) -> None:
        """An audit record from the gateway or one of its ports (kept when [audit] is on)."""
        if self.audit is not None:
            self.audit.record(event, **fields)

    def _open_port(
        self, name: str, port_config: PortConfig, config: SiteConfig | None = None
    ) -> Port:
        """Build and open one port; raises what stopped it (after closing what it held)."""
        config = config or self.config
        port = build_port(name, port_config, config.timing, config.endpoints)
        port.talkgroup = config.talkgroup_of(name) or ""
        port.on_report = self.note
        try:
            port.open()
        except Exception as exc:
            if port.recovers_itself:
                log.error("port %s did not open (it keeps trying by itself): %s", name, exc)
                return port
            _close(port)
            raise
        return port

    def _start_port(self, name: str, port_config: PortConfig) -> Port:
        """The port, or, when it cannot start, a DownPort in its place that is retried
        with backoff: one missing file must not keep the rest of the site off the air."""
        try:
            return self._open_port(name, port_config)
        except Exception as exc:
            reason = _reason(exc)
            self.down[name] = _Retry(port_config, reason, due=time.monotonic() + RETRY_FIRST_S)
            log.error(
                "port %s is down: %s; retried in %.0fs, the rest of the site runs",
                name,
                reason,
                RETRY_FIRST_S,
            )
            return DownPort(name, port_config, self.config.timing, reason)

    async def _retry_down_ports(self) -> None:
        """Try each down port again when its backoff is over (1 s, doubling to 30 s)."""
        for name, retry in self.down.items():  # down since start: now the audit log is open
            self.engine.emit(Event("port_down", name, detail=retry.reason))
        while True:
            await asyncio.sleep(0.25)
            async with self._reloading:  # a reload may remove or replace a down port
                for name in [n for n, r in self.down.items() if r.due <= time.monotonic()]:
                    await self._retry_port(name, self.down[name])

    async def _retry_port(self, name: str, retry: _Retry) -> None:
        loop = asyncio.get_running_loop()
        try:
            port = await loop.run_in_executor(None, self._open_port, name, retry.config)
        except Exception as exc:
            wait = min(RETRY_MAX_S, RETRY_FIRST_S * 2**retry.attempts)
            retry.attempts += 1
            retry.due = time.monotonic() + wait
            reason = _reason(exc)
            log.warning(
                "port %s still down after %d attempts: %s; next try in %.0fs",
                name,
                retry.attempts,
                reason,
                wait,
            )
            if reason != retry.reason:
                retry.reason = self.ports[name].down_reason = reason  # type: ignore[attr-defined]
                self.engine.emit(Event("port_down", name, detail=reason))
            return
        del self.down[name]
        stand_in, self.ports[name] = self.ports[name], port
        engine = self.engine
        dynamic = [p for p in engine.ports if p.name in engine.attached]
        engine.configure(
            [*self.ports.values(), *dynamic],
            engine.talkgroups,
            engine.patches,
            engine.active_patches,
        )
        _close(stand_in)
        log.info("port %s is up, after %d attempts", name, retry.attempts + 1)
        engine.emit(Event("port_up", name, detail=f"after {retry.attempts + 1} attempts"))

    # --- reload -------------------------------------------------------------------

    def reload(self, path: str | Path | None = None, by: str = "api") -> ReloadResult:
        """Re-read the config and apply the difference between two ticks.

        A config that fails validation, or one with a port that cannot start, is
        refused as a whole and the running one stays; either way the outcome is
        logged and audited with ``by`` (who asked). This blocks while new ports
        open; the running gateway reloads with :meth:`reload_live`, which does not.
        """
        new = self._read(path)
        return self._done(new, by) if isinstance(new, ReloadResult) else self.apply(new, by)

    async def reload_live(
        self, path: str | Path | None = None, by: str = "SIGHUP", ref: str | None = None
    ) -> ReloadResult:
        """:meth:`reload` without stalling the tick (SIGHUP, ``run --watch``).

        Opening a sound card takes its process about 0.2 s and closing one as long,
        which on the event loop would stall every call, console and radio that long.
        So ports open and close on a worker thread while the tick goes on, and only
        the swap into the engine runs on the loop, between two ticks. ``ref`` is the
        id of the command that asked (MQTT), for the audit log.
        """
        async with self._reloading:
            new = self._read(path)
            if isinstance(new, ReloadResult):
                return self._done(new, by, ref)
            loop = asyncio.get_running_loop()
            try:
                plan = self._plan(new)
                opened = await loop.run_in_executor(None, self._open_ports, plan, new)
                result, retired = self._swap_or_undo(new, plan, opened, by, ref)
            except Exception as exc:
                return self._done(self._failed(new, exc), by, ref)
            await loop.run_in_executor(None, _close_all, retired)
            return self._done(result, by, ref)

    def apply(self, new: SiteConfig, by: str = "api") -> ReloadResult:
        """Apply an already validated config (blocking, like :meth:`reload`)."""
        refusal = self._refusal(new)
        if refusal is not None:
            return self._done(refusal, by)
        try:
            plan = self._plan(new)
            result, retired = self._swap_or_undo(new, plan, self._open_ports(plan, new), by)
        except Exception as exc:
            return self._done(self._failed(new, exc), by)
        _close_all(retired)
        return self._done(result, by)

    def _failed(self, new: SiteConfig, exc: Exception) -> ReloadResult:
        message = f"{new.source or 'config'}: {_reason(exc)}"
        log.error(
            "reload refused, the running config stays in force: %s",
            message,
            exc_info=not isinstance(exc, PortStartError),
        )
        return ReloadResult(False, [], [], [], message)

    def _done(self, result: ReloadResult, by: str, ref: str | None = None) -> ReloadResult:
        """Count and audit a reload, whatever came of it."""
        if result.ok:
            self.note("reload", by=by, id=ref, ok=True, changes=result.summary)
        else:
            self.reload_failures += 1
            self.note("reload", by=by, id=ref, ok=False, error=result.error)
        return result

    def _read(self, path: str | Path | None) -> SiteConfig | ReloadResult:
        """The new config, or the refusal (logged) that keeps the running one."""
        path = path or self.config.source
        try:
            new = load_config(path, self.config.endpoints)
        except ConfigError as exc:
            log.error("reload refused, the running config stays in force:\n%s", exc)
            return ReloadResult(False, [], [], [], str(exc))
        return self._refusal(new) or new

    def _refusal(self, new: SiteConfig) -> ReloadResult | None:
        """The refusal (logged) of what cannot change live, or None."""
        reasons = []
        if new.timing != self.config.timing:
            reasons.append("timing (frame, rate) cannot change live")
        for section in sorted(self.sections_off):
            if new.section(section) is not None:
                reasons.append(f"[{section}] was added; its service starts with the gateway")
        for service in self.services:
            refuse = getattr(service, "refuse_reload", None)
            if refuse is not None and (reason := refuse(new)):
                reasons.append(reason)
        if not reasons:
            return None
        message = f"{new.source or 'config'}: {'; '.join(reasons)}; restart the gateway"
        log.error("reload refused, the running config stays in force: %s", message)
        return ReloadResult(False, [], [], [], message)

    def _plan(self, new: SiteConfig) -> _Plan:
        old = self.config.ports
        wanted = {n: c for n, c in new.ports.items() if c.enabled}
        return _Plan(
            wanted=wanted,
            removed=[n for n in self.ports if n not in wanted],
            changed=[n for n in self.ports if n in wanted and wanted[n] != old.get(n)],
            added=[n for n in wanted if n not in self.ports],
        )

    def _open_ports(self, plan: _Plan, new: SiteConfig) -> dict[str, Port]:
        """The changed and added ports, built and opened (not yet in the engine).

        One that cannot start refuses the whole reload (the running port, if any,
        keeps going): the ports opened so far are closed again.
        """
        opened: dict[str, Port] = {}
        try:
            for name in plan.changed + plan.added:
                try:
                    opened[name] = self._open_port(name, plan.wanted[name], new)
                except Exception as exc:
                    raise PortStartError(f"port {name} cannot start: {_reason(exc)}") from exc
        except Exception:
            _close_all(list(opened.values()))
            raise
        return opened

    def _swap_or_undo(
        self, new: SiteConfig, plan: _Plan, opened: dict[str, Port], by: str, ref: str | None = None
    ) -> tuple[ReloadResult, list[Port]]:
        """:meth:`_swap`, or, if it fails half-way, the engine as it was and the new ports
        closed."""
        engine = self.engine
        before = (list(engine.ports), engine.talkgroups, engine.patches, engine.active_patches)
        runtime = set(engine.runtime_patches)
        try:
            return self._swap(new, plan, opened, by, ref)
        except Exception:
            engine.configure(*before)
            engine.runtime_patches = runtime
            _close_all(list(opened.values()))
            raise

    def _swap(
        self, new: SiteConfig, plan: _Plan, opened: dict[str, Port], by: str, ref: str | None = None
    ) -> tuple[ReloadResult, list[Port]]:
        """Put the new ports and talkgroups into the engine; returns the ports to close."""
        ports = dict(self.ports)
        retired = [ports.pop(n) for n in plan.removed + plan.changed]
        for name in plan.removed + plan.changed:
            self.down.pop(name, None)  # replaced or gone: no more retries
        ports.update(opened)
        ports = {n: ports[n] for n in plan.wanted}
        # Calls and consoles attached at run time stay, unless their talkgroup is gone.
        engine = self.engine
        dynamic = [p for p in engine.ports if p.name in engine.attached]
        for port in dynamic:
            if engine.attached[port.name][0] not in new.talkgroups:
                engine.attached.pop(port.name)
                retired.append(port)
        dynamic = [p for p in dynamic if p.name in engine.attached]
        patched = set(engine.active_patches)
        kept = self._kept_runtime_patches(new)
        active = [n for n, p in new.patches.items() if p.enabled]
        active += [n for n in kept if n in patched]
        engine.runtime_patches = set(kept)
        engine.configure(
            [*ports.values(), *dynamic], new.talkgroups, {**new.patches, **kept}, active
        )
        flipped = sorted(patched ^ engine.active_patches)  # turned on or off by the file
        for name in flipped:
            on = name in engine.active_patches
            engine.emit(
                Event(
                    "patch",
                    detail=f"{name} {'on' if on else 'off'}",
                    tick=engine.tick_count,
                    by=f"reload:{by}",
                    ref=ref,
                )
            )
        self.ports = ports
        changes = describe_changes(self.config, new)
        self.config = new
        for service in self.services:
            reconfigure = getattr(service, "reconfigure", None)
            if reconfigure is not None:
                try:
                    reconfigure(new)
                except Exception:  # the rest of the site has changed: say so, loudly
                    log.exception("%s did not take the new config", type(service).__name__)
        result = ReloadResult(True, plan.added, plan.removed, plan.changed, changes=changes)
        log.info("config applied: %s", result.summary)
        return result, retired

    def _kept_runtime_patches(self, new: SiteConfig) -> dict[str, PatchConfig]:
        """Patches made at run time that survive ``new``: each of their talkgroups still
        exists and the file does not now use the name. The rest turn off (a ``patch off``
        event, audited with ``reload:...``)."""
        engine = self.engine
        return {
            name: engine.patches[name]
            for name in sorted(engine.runtime_patches)
            if name in engine.patches
            and name not in new.patches
            and all(tg in new.talkgroups for tg in engine.patches[name].talkgroups)
        }

    # --- run ------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self, seconds: float | None = None, watch: bool = False) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        tasks: list[asyncio.Task] = []
        try:
            for endpoint in self.config.endpoints:
                service = self._build_service(endpoint)
                if service is not None:
                    await service.start()
                    self.services.append(service)
            clock = asyncio.create_task(self.clock.run(), name="media-clock")
            tasks.append(clock)
            tasks.append(asyncio.create_task(self._retry_down_ports(), name="port-retries"))
            if watch and self.config.source:
                # Read the file's time now: an edit before the task first runs still counts.
                since = self.config.source.stat().st_mtime_ns
                tasks.append(asyncio.create_task(self._watch(self.config.source, since)))
            stop = asyncio.create_task(self._stop.wait())
            tasks.append(stop)
            await asyncio.wait([clock, stop], timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            if clock.done() and clock.exception():
                raise clock.exception()  # type: ignore[misc]
        finally:
            self.clock.stop()
            self.shutdown()
            for task in tasks:
                task.cancel()
            for service in reversed(self.services):
                await _stop_within(service, SERVICE_STOP_SECONDS)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _build_service(self, endpoint: Endpoint) -> Service | None:
        """The endpoint's service when the site has its section, kept as
        ``gateway.<section>`` so other parts find the web server, SIP stack, MQTT client
        or audit log there; None otherwise (``endpoint.missing`` logged, if it says why)."""
        if endpoint.service is None:
            return None
        config = self.config.section(endpoint.section)
        if config is None:
            if endpoint.missing:
                log.warning(endpoint.missing)
            self.sections_off.add(endpoint.section)
            return None
        service = load(endpoint.service)(self, config)
        setattr(self, endpoint.section, service)
        return service

    def _reload_on_signal(self) -> None:
        task = asyncio.ensure_future(self.reload_live(by="SIGHUP"))
        self._reloads.add(task)  # kept until done, or the loop may drop it
        task.add_done_callback(self._reloads.discard)

    def shutdown(self) -> None:
        """Unkey every transmitter, then close every port. Safe to call twice."""
        keyed = [p.name for p in self.engine.ports if p.keyed]
        self.engine.unkey_all()
        for port in self.engine.ports:
            _close(port)
        log.info(
            "shutdown: unkeyed %s; closed %d ports",
            ", ".join(keyed) or "nothing",
            len(self.engine.ports),
        )

    async def _watch(self, path: Path, last: int, interval: float = 1.0) -> None:
        """``run --watch``: reload when the file's modification time changes."""
        while True:
            await asyncio.sleep(interval)
            try:
                now = path.stat().st_mtime_ns
            except OSError:
                continue
            if now != last:
                last = now
                await self.reload_live(path, by="--watch")


async def _stop_within(service, seconds: float) -> None:  # noqa: ANN001 - any service
    """Stop ``service``, waiting at most ``seconds``: a stop that hangs (a BYE to a peer
    that is itself going away, a TLS close the far end never answers) must not keep the
    gateway from exiting. (``wait_for`` would wait on past its timeout for a stop that
    swallows the cancellation.)"""
    stopping = asyncio.ensure_future(service.stop())
    done, _ = await asyncio.wait({stopping}, timeout=seconds)
    if not done:
        stopping.cancel()
        log.warning(
            "%s did not stop within %.1f s; the gateway stops without it",
            type(service).__name__,
            seconds,
        )
    elif not stopping.cancelled() and stopping.exception() is not None:
        log.warning("%s failed to stop cleanly: %s", type(service).__name__, stopping.exception())


class PortStartError(Exception):
    """A port of a new config could not be built or opened."""


@dataclass
class _Retry:
    """A port that could not start: its config, why, and when to try again."""

    config: PortConfig
    reason: str
    attempts: int = 1
    due: float = 0.0  # time.monotonic()


def _reason(exc: BaseException) -> str:
    """An exception as one line a radio engineer can act on."""
    text = str(exc).strip()
    return text if text else type(exc).__name__


@dataclass
class _Plan:
    """What a reload changes: port names to remove, to rebuild, and to add."""

    wanted: dict[str, PortConfig]
    removed: list[str]
    changed: list[str]
    added: list[str]


def _close_all(ports: list[Port]) -> None:
    for port in ports:
        _close(port)


def _close(port: Port) -> None:
    try:
        port.close()
    except Exception:
        log.exception("port %s: close failed", port.name)


def _log_event(event: Event) -> None:
    if event.kind in ("fault", "tot", "preempted"):
        log.warning("%s %s %s %s", event.kind, event.port or "", event.group or "", event.detail)
    else:
        log.info("%s %s %s %s", event.kind, event.port or "", event.group or "", event.detail)
