"""Operator sessions, login throttling and the console's audit trail.

Sessions live in memory: a gateway restart logs everyone out, which is what a
dispatcher expects after a restart anyway. The cookie is HttpOnly (page scripts
cannot read it) and SameSite=Strict (another site cannot ride on it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.webrtc.config import ConsoleConfig, OperatorConfig
from gateway.webrtc.passwords import hash_password, verify_password

COOKIE = "borderlink_session"
log = logging.getLogger(__name__)

_dummy_hash = ""
MAX_THROTTLE_KEYS = 10000  # failure counters kept; a name spray cannot grow memory
LOCKED_AUDIT_SECONDS = 5.0  # a locked-out key's tries: one audit record this often, counted
ADDRESS_FACTOR = 4  # an address may fail this many times login_attempts over all names
HASH_THREADS = 2  # scrypt checks running at once (each ≈ 0.1 s of one core, 16 MB)
HASH_WAITING = 6  # logins queued for a hash thread; more are answered 503 at once
HASH_NICE = 10  # the hash threads' CPU priority (0 normal, 19 lowest)


def _dummy() -> str:
    """Verified against when the operator does not exist, so the response time does
    not reveal which operator names exist. Made on first use: scrypt is slow on purpose."""
    global _dummy_hash
    if not _dummy_hash:
        _dummy_hash = hash_password(secrets.token_hex(8))
    return _dummy_hash


def _check(password: str, stored: str | None) -> bool:
    """In a hash thread: the password against the operator's hash (or the dummy)."""
    return verify_password(password, stored if stored is not None else _dummy())


def _low_priority() -> None:
    """A hash thread yields the CPU to the media clock (Linux nice is per thread): on a
    busy machine two scrypt threads at normal priority still starve the clock. Nice 10
    (a tenth of a normal thread's share), not 19: on a saturated machine a login then
    takes about a second, not ten."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICE)


class LoginBusy(Exception):
    """Every hash thread is busy and the queue is full: the caller answers 503."""


class Hasher:
    """Password checks in worker threads, a bounded number at once.

    scrypt costs ≈ 0.1 s of CPU on purpose. On the event loop each login would
    stall the media clock that long (a gap in every talkgroup, a late tick per
    login); a stranger's flood of logins would silence the site. hashlib releases
    the GIL while it hashes, and the threads run at a low CPU priority, so
    hashing waits for the clock rather than the clock for hashing. At most
    ``threads`` hashes run and ``waiting`` more queue (a coroutine each, no thread);
    beyond that a login is refused at once, so a flood costs bounded CPU, memory
    and threads."""

    def __init__(self, threads: int = HASH_THREADS, waiting: int = HASH_WAITING) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(
            threads, "console-scrypt", initializer=_low_priority
        )
        self.limit = threads + waiting
        self.in_flight = 0  # running or queued; freed when the hash ends, not the request
        self.refused = 0

    async def verify(self, password: str, stored: str | None) -> bool:
        if self.in_flight >= self.limit:
            self.refused += 1
            raise LoginBusy
        self.in_flight += 1
        done = asyncio.wrap_future(self.pool.submit(_check, password, stored))
        done.add_done_callback(self._finished)
        # A client that hangs up does not free the slot early: the hash still runs.
        return await asyncio.shield(done)

    def _finished(self, _: asyncio.Future) -> None:
        self.in_flight -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Session:
    token: str
    operator: str
    config: OperatorConfig
    address: str
    expires: float
    created: float = field(default_factory=time.monotonic)


class LoginThrottle:
    """At most ``attempts`` failures per ``window`` per key, then the key is refused for
    ``lockout`` seconds. The console keys it per (operator, address): a colleague's typos
    or an attacker guessing one operator's password lock out that operator at that
    workstation only, never the whole dispatch room behind one address."""

    def __init__(self, attempts: int, window: float, lockout: float) -> None:
        self.attempts = attempts
        self.window = window
        self.lockout = lockout
        self.failures: dict[str, deque[float]] = defaultdict(deque)
        self.locked_until: dict[str, float] = {}

    def retry_after(self, keys: list[str], now: float) -> float:
        """Seconds until these keys may try again (0: now)."""
        for key in [k for k in keys if self.locked_until.get(k, now) <= now]:
            self.locked_until.pop(key, None)  # expired locks do not pile up
        return max((self.locked_until.get(k, 0.0) - now for k in keys), default=0.0)

    def failed(self, keys: list[tuple[str, int]], now: float) -> bool:
        """Count a failure against each (key, allowed failures); True when one locked."""
        locked = False
        for key, attempts in keys:
            times = self.failures[key]
            times.append(now)
            while times and times[0] < now - self.window:
                times.popleft()
            if len(times) >= attempts:
                self.locked_until[key] = now + self.lockout
                del self.failures[key]
                locked = True
        if len(self.failures) > MAX_THROTTLE_KEYS:  # a spray of names: forget the oldest
            for key in list(self.failures)[: len(self.failures) - MAX_THROTTLE_KEYS]:
                del self.failures[key]
        return locked

    def succeeded(self, keys: list[str]) -> None:
        for key in keys:
            self.failures.pop(key, None)


class LockedAudit:
    """Every try refused during a lock-out is audited: the first at once, the rest
    summed into one record per key every ``every`` seconds (``tries``), so an
    attacker hammering a locked account cannot flood the log and no try goes uncounted."""

    def __init__(self, write: Callable[[str, str, int], None], every: float) -> None:
        self.write = write  # (operator, address, tries)
        self.every = every
        self.pending: dict[tuple[str, str], list[int]] = {}  # key → [tries not yet written]

    def tried(self, operator: str, address: str) -> None:
        key = (operator, address)
        if key in self.pending:
            self.pending[key][0] += 1
            return
        self.write(operator, address, 1)
        if len(self.pending) < MAX_THROTTLE_KEYS:
            self.pending[key] = [0]
            asyncio.get_event_loop().call_later(self.every, self._flush, key)

    def _flush(self, key: tuple[str, str]) -> None:
        tries = self.pending[key][0]
        if not tries:
            del self.pending[key]
            return
        self.write(*key, tries)
        self.pending[key][0] = 0
        asyncio.get_event_loop().call_later(self.every, self._flush, key)


class ConsoleAudit:
    """Console records for the site's audit log (``[audit]``), and the process log.

    Fields are only config-named identities (operators, talkgroups) and the
    client's address; a name typed at a failed login is not echoed unless it is
    a configured operator.
    """

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def __call__(self, event: str, *, warn: bool = False, **fields: Any) -> None:
        text = " ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, ""))
        log.log(logging.WARNING if warn else logging.INFO, "%s %s", event, text)
        sink = getattr(self.gateway, "audit", None)
        if sink is not None and hasattr(sink, "record"):
            sink.record(event, **fields)


class Sessions:
    """Logged-in operators. ``config`` is read on every use, so a reload that removes
    an operator ends their session at their next request."""

    def __init__(self, config: Callable[[], ConsoleConfig], audit: ConsoleAudit) -> None:
        self._config = config
        self.audit = audit
        self.logins = 0
        self.failures = 0
        self.by_token: dict[str, Session] = {}
        first = config()
        self.throttle = LoginThrottle(first.login_attempts, first.login_window, first.login_lockout)
        self.locked_audit = LockedAudit(self._write_locked, LOCKED_AUDIT_SECONDS)
        self.hasher = Hasher()

    @property
    def config(self) -> ConsoleConfig:
        return self._config()

    async def login(
        self, operator: str, password: str, address: str
    ) -> tuple[Session | None, float]:
        """(session, 0) on success; (None, retry_after_seconds) when refused.

        Raises :class:`LoginBusy` when too many logins are being checked already."""
        now = time.monotonic()
        pair = f"pair:{operator.lower()}|{address}"
        spray = f"addr:{address}"
        keys = [pair, spray]
        wait = self.throttle.retry_after(keys, now)
        if wait > 0:
            self.failures += 1
            self.locked_audit.tried(self._known(operator), address)
            return None, wait
        account = self.config.operators.get(operator)
        ok = await self.hasher.verify(password, account.password_hash if account else None)
        now = time.monotonic()
        if account is not None:  # a reload during the hash: the account as it is now
            current = self.config.operators.get(operator)
            if current is None or current.password_hash != account.password_hash:
                ok = False  # removed, or its password changed: the old one no longer opens
            account = current
        if not (ok and account):
            self.failures += 1
            attempts = self.throttle.attempts
            # The address as a whole is limited too, but far above one operator's
            # allowance: it stops a spray of names without a colleague's typos
            # locking the room out.
            locked = self.throttle.failed(
                [(pair, attempts), (spray, attempts * ADDRESS_FACTOR)], now
            )
            self.audit(
                "console_login_failed",
                warn=True,
                operator=self._known(operator),
                address=address,
                locked_out=locked,
            )
            return None, self.throttle.retry_after(keys, now) if locked else 0.0
        self.throttle.succeeded([pair])
        self.logins += 1
        session = Session(
            secrets.token_urlsafe(32),
            operator,
            account,
            address,
            now + self.config.session_lifetime,
        )
        self.by_token[session.token] = session
        self.audit("console_login", operator=operator, address=address)
        return session, 0.0

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        session = self.by_token.get(token)
        if session is None:
            return None
        if session.expires < time.monotonic():
            self.by_token.pop(token, None)
            self.audit("console_session_expired", operator=session.operator)
            return None
        reason = self.invalid_reason(session)
        if reason:
            self.end(token, reason)
            return None
        session.config = self.config.operators[session.operator]  # permissions follow a reload
        return session

    def invalid_reason(self, session: Session) -> str:
        """Why the running config no longer accepts this session ('' when it does): the
        account was removed, or its password changed (whoever knew the old one is out)."""
        current = self.config.operators.get(session.operator)
        if current is None:
            return "operator removed from config"
        if current.password_hash != session.config.password_hash:
            return "password changed"
        return ""

    def end(self, token: str, reason: str) -> Session | None:
        """End a session for a reason other than logout (audited)."""
        session = self.by_token.pop(token, None)
        if session:
            self.audit("console_session_ended", warn=True, operator=session.operator, reason=reason)
        return session

    def _write_locked(self, operator: str, address: str, tries: int) -> None:
        self.audit(
            "console_login_locked", warn=True, operator=operator, address=address, tries=tries
        )

    def _known(self, operator: str) -> str:
        return operator if operator in self.config.operators else "(unknown)"

    def logout(self, token: str) -> Session | None:
        session = self.by_token.pop(token, None)
        if session:
            self.audit("console_logout", operator=session.operator)
        return session
