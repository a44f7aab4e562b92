"""Operator sessions, login throttling and the console's audit trail.

Sessions live in memory: a gateway restart logs everyone out, which is what a
dispatcher expects after a restart anyway. The cookie is HttpOnly (page scripts
cannot read it) and SameSite=Strict (another site cannot ride on it).
"""

from __future__ import annotations

import logging
import secrets
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


def _dummy() -> str:
    """Verified against when the operator does not exist, so the response time does
    not reveal which operator names exist. Made on first use: scrypt is slow on purpose."""
    global _dummy_hash
    if not _dummy_hash:
        _dummy_hash = hash_password(secrets.token_hex(8))
    return _dummy_hash


@dataclass
class Session:
    token: str
    operator: str
    config: OperatorConfig
    address: str
    expires: float
    created: float = field(default_factory=time.monotonic)


class LoginThrottle:
    """At most ``attempts`` failures per ``window`` per user and per address."""

    def __init__(self, attempts: int, window: float, lockout: float) -> None:
        self.attempts = attempts
        self.window = window
        self.lockout = lockout
        self.failures: dict[str, deque[float]] = defaultdict(deque)
        self.locked_until: dict[str, float] = {}

    def retry_after(self, keys: list[str], now: float) -> float:
        """Seconds until these keys may try again (0: now)."""
        return max((self.locked_until.get(k, 0.0) - now for k in keys), default=0.0)

    def failed(self, keys: list[str], now: float) -> bool:
        """Count a failure; True when this failure locked a key out."""
        locked = False
        for key in keys:
            times = self.failures[key]
            times.append(now)
            while times and times[0] < now - self.window:
                times.popleft()
            if len(times) >= self.attempts:
                self.locked_until[key] = now + self.lockout
                times.clear()
                locked = True
        return locked

    def succeeded(self, keys: list[str]) -> None:
        for key in keys:
            self.failures.pop(key, None)


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

    @property
    def config(self) -> ConsoleConfig:
        return self._config()

    def login(self, operator: str, password: str, address: str) -> tuple[Session | None, float]:
        """(session, 0) on success; (None, retry_after_seconds) when refused."""
        now = time.monotonic()
        keys = [f"user:{operator.lower()}", f"addr:{address}"]
        wait = self.throttle.retry_after(keys, now)
        if wait > 0:
            self.failures += 1
            self.audit("console_login_locked", warn=True, operator=self._known(operator),
                       address=address)  # fmt: skip
            return None, wait
        account = self.config.operators.get(operator)
        ok = verify_password(password, account.password_hash if account else _dummy())
        if not (ok and account):
            self.failures += 1
            locked = self.throttle.failed(keys, now)
            self.audit("console_login_failed", warn=True, operator=self._known(operator),
                       address=address, locked_out=locked)  # fmt: skip
            return None, self.throttle.retry_after(keys, now) if locked else 0.0
        self.throttle.succeeded(keys)
        self.logins += 1
        session = Session(secrets.token_urlsafe(32), operator, account, address,
                          now + self.config.session_lifetime)  # fmt: skip
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
            self.audit("console_session_ended", warn=True, operator=session.operator,
                       reason=reason)  # fmt: skip
        return session

    def _known(self, operator: str) -> str:
        return operator if operator in self.config.operators else "(unknown)"

    def logout(self, token: str) -> Session | None:
        session = self.by_token.pop(token, None)
        if session:
            self.audit("console_logout", operator=session.operator)
        return session
