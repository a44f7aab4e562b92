"""The audit log: who talked, keyed, patched, called or logged in, where and for how long.

Cross-border information sharing needs accountability, so every PTT, talk burst,
patch change, call and login becomes one JSON line in an append-only file:

    {"seq": 17, "ts": "2026-11-27T21:50:03.120Z", "site": "…", "event": "talk",
     "port": "uscg_vhf", "agency": "USCG", "talkgroup": "shiprider_marine",
     "start": "2026-11-27T21:49:59.120Z", "duration_seconds": 4.0}

- Each line is one ``write(2)`` on an ``O_APPEND`` descriptor, made the moment the
  event happens: a crash of the gateway loses nothing that was logged. An fsync
  follows within ``sync_every`` (in a worker thread, off the media clock) so a
  power cut loses at most that long.
- ``seq`` numbers every line of a run, so a missing line shows.
- Files rotate by size and at UTC midnight; ``keep`` rotated files are kept.
- Only names the site config gives (ports, talkgroups, patches, agencies,
  operators) and identities that were proven are written — a SIP caller's digest
  user, TLS certificate name or trusted proxy's asserted identity, with its
  address: this log is where a call's caller is named, and the only place. Two
  more things from outside are kept on purpose: a console client's address at
  login (normal in an audit trail: it ties a login to a workstation) and an MQTT
  command's ``id`` (the commander's reference, cut to 64 characters). No audio,
  no name a caller wrote itself, no other free text. docs/audit.md lists every
  event and its fields (a test holds the code to it).
- Audio recording is separate (a ``recorder`` port in a talkgroup) and off
  unless configured; the first line of each run says, per talkgroup, which.

Endpoints add their own records with :meth:`AuditLog.record` (the console's
logins, the SIP stack's calls), reaching it as ``gateway.audit``. Ports attached
at run time (calls, console sessions) are also logged generically when they
join and leave the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from gateway.config import Model, writable_problem
from gateway.units import Duration

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.engine import Event

log = logging.getLogger(__name__)


class AuditConfig(Model):
    """``[audit]``: where the audit log goes and how it rotates."""

    path: Path = Field(description="the current audit file; rotated files sit beside it")
    max_size_kb: int = Field(100 * 1024, ge=1, description="rotate when the file reaches this")
    rotate_daily: bool = True
    keep: int = Field(90, ge=1, description="rotated files kept; older ones are deleted")
    sync_every: Duration = 1.0

    def file_problems(self) -> list[tuple[tuple[str, ...], str]]:
        problem = writable_problem(Path(self.path).parent)
        return [(("path",), f"{problem}; nothing would be audited")] if problem else []

    def summary_lines(self) -> list[str]:
        daily = " and at UTC midnight" if self.rotate_daily else ""
        return [f"{self.path}, rotated at {self.max_size_kb} KiB{daily}, {self.keep} kept"]


def utc_iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class AuditFile:
    """Append-only JSON lines with size/day rotation. Never raises into the caller."""

    def __init__(self, config: AuditConfig, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self.path = Path(config.path)
        self.now = now
        self.fd: int | None = None
        self.size = 0
        self.day = ""
        self.records = 0
        self.write_errors = 0
        self.dirty = False

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.size = os.fstat(self.fd).st_size
        self.day = self._day(self.now())
        stale = self._day(self.path.stat().st_mtime) != self.day
        if self.size and stale and self.config.rotate_daily:
            self._rotate()  # yesterday's file: start today's

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            if self.fd is None:
                raise OSError("audit file is not open")
            today = self._day(self.now())
            too_big = self.size and self.size + len(line) > self.config.max_size_kb * 1024
            if too_big or (self.config.rotate_daily and today != self.day):
                self._rotate()
                self.day = today
            os.write(self.fd, line)
            self.size += len(line)
            self.records += 1
            self.dirty = True
        except OSError as exc:
            self.write_errors += 1
            log.error("audit record not written (%s): %s", exc, line.decode().strip())

    def _rotate(self) -> None:
        """Current file → ``NAME.YYYYmmddTHHMMSSZ`` (unique), then a fresh one; prune old ones."""
        assert self.fd is not None
        with contextlib.suppress(OSError):
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        stamp = datetime.fromtimestamp(self.now(), UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.{stamp}-{n}")
            n += 1
        os.replace(self.path, target)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.size = 0
        for old in self.rotated()[: -self.config.keep]:
            with contextlib.suppress(OSError):
                old.unlink()

    def rotated(self) -> list[Path]:
        """Rotated files, oldest first (their names sort by time)."""
        return sorted(self.path.parent.glob(self.path.name + ".*"))

    def sync(self) -> None:
        """fsync a duplicate descriptor (safe while the writer rotates)."""
        if self.fd is None or not self.dirty:
            return
        self.dirty = False
        fd = os.dup(self.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _day(epoch: float) -> str:
        return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d")


class AuditLog:
    """The service: engine events and run-time ports → audit records."""

    def __init__(self, gateway: Gateway, config: AuditConfig, now: Callable[[], float] = time.time):
        self.gateway = gateway
        self.config = config
        self.now = now
        self.file = AuditFile(config, now)
        self.seq = 0
        self._attached: dict[str, tuple[float, str, str]] = {}
        self._tasks: list[asyncio.Task] = []

    # --- the public API for endpoints ------------------------------------------------

    def record(self, event: str, **fields: Any) -> None:
        """Write one record now. Give only config-named or proven identities (operator,
        port, account, authenticated caller)."""
        self.seq += 1
        entry = {"seq": self.seq, "ts": utc_iso(self.now()), "site": self.gateway.config.site.name}
        entry["event"] = event
        entry.update({k: v for k, v in fields.items() if v is not None and v != ""})
        self.file.write(entry)

    def stats(self) -> dict[str, float]:
        return {"audit_records": self.file.records, "audit_write_errors": self.file.write_errors}

    # --- service ---------------------------------------------------------------------

    async def start(self) -> None:
        self.file.open()
        recording = self.recording_policy()
        self.record("audit_start", recording=recording, version=_version())
        if all(state == "off" for state in recording.values()):
            log.info("audit log at %s; audio recording is off for every talkgroup", self.file.path)
        self.gateway.engine.listeners.append(self.on_event)
        engine = self.gateway.engine
        kinds = {p.name: p.kind for p in engine.ports}
        self._attached = {  # already on the engine before the audit log started
            name: (self.now(), kinds.get(name, "port"), tg)
            for name, (tg, _) in engine.attached.items()
        }
        self._tasks = [asyncio.create_task(self._sync_loop(), name="audit-sync")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(ValueError):
            self.gateway.engine.listeners.remove(self.on_event)
        for name in list(self._attached):  # still on at shutdown: close their records
            self._left(name)
        self.record("audit_stop")
        self.file.close()

    def recording_policy(self) -> dict[str, str]:
        """Per talkgroup: 'off', or 'on: <recorder port>' when a recorder port is a member."""
        config = self.gateway.config
        policy = {}
        for name, tg in config.talkgroups.items():
            recorders = [
                m
                for m in tg.members
                if m in config.ports
                and config.ports[m].kind == "recorder"
                and config.ports[m].enabled
            ]
            policy[name] = f"on: {', '.join(recorders)}" if recorders else "off"
        return policy

    # --- engine events ---------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        now = self.now()
        port = event.port
        fields: dict[str, Any] = {}
        if port is not None:
            fields = {"port": port, "agency": self._agency(port)}
            if event.label and event.label != port:
                fields["label"] = event.label
            fields["talkgroup"] = self._talkgroup(port)
        if event.group and event.group != fields.get("talkgroup"):
            fields["mix_group"] = event.group
        if event.talker:  # a link leg: the far side's talker label, as its gateway sent it
            fields["talker"] = event.talker
        kind = event.kind
        if kind in ("talk_stop", "ptt_off"):
            name = "talk" if kind == "talk_stop" else "transmit"
            self.record(
                name,
                **fields,
                start=utc_iso(now - event.seconds),
                duration_seconds=round(event.seconds, 3),
            )
        elif kind == "patch":
            patch, _, state = event.detail.partition(" ")
            patch_cfg = self.gateway.engine.patches.get(patch)
            self.record(
                "patch",
                patch=patch,
                old="off" if state == "on" else "on",
                state=state,
                talkgroups=list(patch_cfg.talkgroups) if patch_cfg else None,
                by=event.by,
                id=event.ref,
            )
        elif kind == "preempted":
            self.record(kind, **fields, by=event.detail.removeprefix("by "))
        elif kind in ("fault", "port_down"):
            self.record(kind, **fields, reason=event.detail)
        elif kind == "joined":
            self._attached[port] = (now, event.detail or "port", event.talkgroup or "")
            self.record(
                "joined",
                port=port,
                kind=event.detail,
                talkgroup=event.talkgroup,
                label=fields.get("label"),
            )
        elif kind == "left":
            self._left(port)
        else:  # talk_start, ptt_on, floor_granted, tot, and endpoint events
            self.record(kind, **fields)

    def _agency(self, port: str) -> str:
        cfg = self.gateway.config.ports.get(port)
        return cfg.agency if cfg is not None else ""

    def _talkgroup(self, port: str) -> str | None:
        engine = self.gateway.engine
        if port in engine.attached:
            return engine.attached[port][0]
        return self.gateway.config.talkgroup_of(port)

    # --- run-time ports (calls, console sessions) --------------------------------------

    def _left(self, name: str) -> None:
        since, kind, tg = self._attached.pop(name, (self.now(), "port", ""))
        self.record(
            "left",
            port=name,
            kind=kind,
            talkgroup=tg,
            start=utc_iso(since),
            duration_seconds=round(self.now() - since, 3),
        )

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.config.sync_every
        while True:
            await asyncio.sleep(period if period > 0 else 0.05)
            try:
                await loop.run_in_executor(None, self.file.sync)
            except OSError as exc:
                log.error("audit fsync failed: %s", exc)


def _version() -> str:
    from gateway import __version__

    return __version__
