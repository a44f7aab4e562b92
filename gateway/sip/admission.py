"""Who may call, and how much: the gate every new INVITE passes before it becomes a call.

In the order a request meets them:

1. **Back-off**: an address that failed digest auth or a PIN is refused for
   ``[sip] backoff`` (``503`` with ``Retry-After``).
2. **INVITE rate** per source address (a token bucket, ``invite_rate`` per
   second, bursts of twice that) and **concurrent calls** per source address
   (``max_calls_per_source``) and for the site (``max_calls``): ``503`` with
   ``Retry-After``. A trusted proxy carries many callers: only the site cap
   applies to it.
3. **Identity** (per route): a source the route trusts (address/CIDR, or
   ``tls:NAME`` proved by a TLS certificate) is believed, and its
   ``P-Asserted-Identity`` is the caller's identity (RFC 3325: only from a
   trusted source); otherwise ``auth = "digest"`` challenges with ``401`` and
   checks the answer (:mod:`gateway.sip.digest`); otherwise the route must be
   ``public``. ``allow`` then matches the proven identity — never ``From``,
   which the caller writes itself.

Every table keyed by a stranger's address is bounded (:data:`SOURCE_TABLE`
entries, oldest dropped first), so an address-spraying flood cannot grow memory.
Refusals are logged once per source per minute, with a count of the rest
(:class:`RefusalLog`).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.sip.config import RouteConfig, SipConfig, trusted_entry
from gateway.sip.digest import DigestAuth
from gateway.sip.message import Headers, Source

log = logging.getLogger(__name__)

SOURCE_TABLE = 4096  # per-source entries kept (rate buckets, back-offs, log windows)
REFUSAL_WINDOW = 60  # seconds: one log line per source per window, then a count
NEW_SOURCES_PER_WINDOW = 20  # sources named in the log per window; the rest are counted
SITE_FULL_RETRY = 10  # seconds to tell a caller when the site is full
_PAI_URI = re.compile(r"<?sips?:([^@;>]+)@([^;>]+)")


@dataclass(frozen=True)
class Refusal:
    """A refused INVITE: the response and, for the log, why (no caller names in it)."""

    code: int
    reason: str
    why: str
    headers: tuple[str, ...] = ()
    audit: str = ""  # audit event to write ("" for none)


@dataclass(frozen=True)
class Admitted:
    """An INVITE that may become a call, and the identity it proved ("" if none)."""

    identity: str
    how: str  # "digest" | "trusted" | "tls" | "public"


class Bounded(OrderedDict):
    """A dict that forgets its oldest entries beyond ``limit`` (per-source state)."""

    def __init__(self, limit: int = SOURCE_TABLE) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key, value) -> None:  # noqa: ANN001 - any key/value
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class RefusalLog:
    """Refusals in the process log: the first from a source in a minute, then a count.

    A flood of refused INVITEs costs one WARNING line per source per minute, plus
    "N more refusals from …" once the minute is over (written at the next refusal).
    Sources beyond :data:`NEW_SOURCES_PER_WINDOW` new ones a minute (a flood from
    many addresses) share one summary line.
    """

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.windows: Bounded = Bounded()  # host → [window start, refusals not logged]
        self.others = [0.0, 0]  # window start, refusals from sources not named

    def __call__(self, host: str, code: int, reason: str, why: str) -> None:
        now = self.now()
        self._flush(now)
        window = self.windows.get(host)
        if window is not None:
            window[1] += 1
            return
        if len(self.windows) >= NEW_SOURCES_PER_WINDOW:
            if not self.others[1]:
                self.others[0] = now
            self.others[1] += 1
            return
        self.windows[host] = [now, 0]
        log.warning("call from %s refused with %d %s: %s", host, code, reason, why)

    def _flush(self, now: float) -> None:
        windows = self.windows
        while windows:  # oldest first: entries are in the order their windows began
            host, (start, count) = next(iter(windows.items()))
            if now - start < REFUSAL_WINDOW:
                break
            del windows[host]
            if count:
                log.warning(
                    "%d more refusals from %s in the last %d s", count, host, REFUSAL_WINDOW
                )
        start, count = self.others
        if count and now - start >= REFUSAL_WINDOW:
            log.warning("%d refusals from other addresses in the last %d s", count, REFUSAL_WINDOW)
            self.others = [now, 0]


class Admission:
    """The gate of new calls; ``calls_from(host)`` and ``calls()`` count the calls up now."""

    def __init__(
        self,
        config: Callable[[], SipConfig],
        calls: Callable[[], int],
        calls_from: Callable[[str], int],
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config  # read at each use: a reload of [sip] applies to the next INVITE
        self.calls = calls
        self.calls_from = calls_from
        self.now = now
        self.digest = DigestAuth(config().realm)
        self.buckets: Bounded = Bounded()  # host → (tokens, last refill)
        self.banned: Bounded = Bounded()  # host → until (monotonic)
        self.refusals = RefusalLog(now)
        self._trusted: tuple[SipConfig | None, list] = (None, [])

    @property
    def config(self) -> SipConfig:
        return self._config()

    def _trusted_entries(self) -> list:
        """Every route's trusted entries, parsed once per config."""
        config = self.config
        if self._trusted[0] is not config:
            entries = [trusted_entry(e) for route in config.routes.values() for e in route.trusted]
            self._trusted = (config, entries)
            self.digest.realm = config.realm
        return self._trusted[1]

    # --- source limits --------------------------------------------------------------

    def limit(self, source: Source) -> Refusal | None:
        """Back-off, INVITE rate and call caps for a new INVITE from ``source``."""
        host = source.address[0]
        now = self.now()
        until = self.banned.get(host)
        if until is not None:
            if until > now:
                wait = math.ceil(until - now)
                return _busy(wait, "backed off after failed authentication or PIN")
            del self.banned[host]
        privileged = self.trusted_anywhere(source)
        if not privileged:
            rate = self.config.invite_rate
            tokens, last = self.buckets.get(host, (2 * rate, now))
            tokens = min(2 * rate, tokens + (now - last) * rate)
            if tokens < 1.0:
                self.buckets[host] = (tokens, now)
                return _busy(math.ceil((1.0 - tokens) / rate), "INVITE rate limit")
            self.buckets[host] = (tokens - 1.0, now)
        if self.calls() >= self.config.max_calls:
            return _busy(SITE_FULL_RETRY, f"site full ({self.config.max_calls} calls)")
        if not privileged and self.calls_from(host) >= self.config.max_calls_per_source:
            return _busy(30, f"{self.config.max_calls_per_source} calls from this address already")
        return None

    def back_off(self, source: Source) -> None:
        """Refuse new INVITEs from this address for ``[sip] backoff`` (failed auth or PIN).

        Not a trusted proxy's: one caller's typo must not lock out everyone behind it."""
        if self.trusted_anywhere(source):
            return
        self.banned[source.address[0]] = self.now() + self.config.backoff

    def backed_off(self) -> int:
        """Addresses refused right now (for metrics)."""
        now = self.now()
        return sum(1 for until in self.banned.values() if until > now)

    # --- identity ---------------------------------------------------------------------

    def trusted_anywhere(self, source: Source) -> bool:
        return _matches(self._trusted_entries(), source)

    def identify(
        self,
        route_name: str,
        route: RouteConfig,
        source: Source,
        method: str,
        call_id: str,
        headers: Headers,
    ) -> Admitted | Refusal:
        """Who is calling, as far as it was proven; or the refusal (401/403)."""
        entries = [trusted_entry(entry) for entry in route.trusted]
        admitted: Admitted | None = None
        if entries and _matches(entries, source):
            # RFC 3325: believe P-Asserted-Identity only from the proxy we trust.
            asserted = _asserted_identity(headers)
            if source.identity and not asserted:
                admitted = Admitted(source.identity, "tls")
            else:
                admitted = Admitted(asserted, "trusted")
        elif route.auth == "digest":
            authorization = headers.get("authorization") or None
            verdict = self.digest.check(
                authorization, method, source.address[0], call_id, route.users
            )
            if verdict.failed:
                self.back_off(source)
                return Refusal(
                    403,
                    "Forbidden",
                    f"digest on route {route_name}: {verdict.failed}",
                    audit="sip_auth_failed",
                )
            if verdict.challenge:
                challenge = self.digest.www_authenticate(source.address[0], verdict.stale)
                return Refusal(
                    401, "Unauthorized", f"challenged for route {route_name}", (challenge,)
                )
            admitted = Admitted(verdict.user, "digest")
        elif source.identity and route.public:
            admitted = Admitted(source.identity, "tls")
        elif route.public:
            admitted = Admitted("", "public")
        if admitted is None:
            return Refusal(403, "Forbidden", f"not from a source route {route_name} trusts")
        if route.allow and not _allowed(admitted.identity, route.allow):
            return Refusal(
                403,
                "Forbidden",
                f"caller's identity not on route {route_name}'s allow list",
                audit="sip_call_refused",
            )
        return admitted


def _busy(retry_after: int, why: str) -> Refusal:
    return Refusal(503, "Service Unavailable", why, (f"Retry-After: {max(1, retry_after)}",))


def _matches(entries: list, source: Source) -> bool:
    try:
        address = ipaddress.ip_address(source.address[0])
    except ValueError:
        address = None
    for entry in entries:
        if isinstance(entry, str):
            if source.identity and entry == f"tls:{source.identity}":
                return True
        elif address is not None and address in entry:
            return True
    return False


def _asserted_identity(headers: Headers) -> str:
    """``user@host`` of the first sip: P-Asserted-Identity (RFC 3325), or ""."""
    value = headers.get("p-asserted-identity")
    if not value:
        return ""
    match = _PAI_URI.search(value)
    return f"{match[1]}@{match[2]}" if match else ""


def _allowed(identity: str, patterns: list[str]) -> bool:
    """``identity`` is ``user`` (digest) or ``user@host`` (asserted, TLS): match either form."""
    if not identity:
        return False
    user = identity.split("@", 1)[0]
    return any(
        fnmatch.fnmatchcase(identity, pattern) or fnmatch.fnmatchcase(user, pattern)
        for pattern in patterns
    )
