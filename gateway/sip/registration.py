"""Keep one extension registered on a PBX, whatever the PBX does.

pyVoIP builds the REGISTER and answers the MD5 digest challenge. The binding is
refreshed every ``keepalive`` (5 s by default, sooner if half the granted expiry
is shorter), and that REGISTER is the keepalive. Why not an OPTIONS ping between
rare refreshes: a registrar that restarts forgets its bindings, and a restart can
be quicker than any ping interval (kamailio is back within a second), so a ping
may never notice. A REGISTER both asks "do you know us?" and answers it: a
restart, however short, is repaired at the next refresh, within ``keepalive`` of
the registrar answering again. The cost is two small transactions per account
per ``keepalive`` (the digest round included).

A REGISTER that gets no answer (or a 5xx) is tried again after ``keepalive`` at
most; one the registrar refuses (401 again: a wrong password, 403, 404) backs
off from 1 s doubling to 60 s, so a wrong password does not hammer the PBX or
trip its brute-force guard. Forever: pyVoIP's own loop gives up after three.
"""

from __future__ import annotations

import asyncio
import logging
import re

from gateway.sip.config import AccountConfig
from gateway.sip.message import SipMessage
from gateway.sip.pyvoip import Dialect
from gateway.sip.tasks import cancel_and_wait
from gateway.sip.transport import SipTransport, Source

log = logging.getLogger(__name__)

RETRY_FIRST = 1.0
RETRY_MAX = 60.0
_EXPIRES = re.compile(r"expires=(\d+)", re.I)


class Registration:
    def __init__(
        self,
        name: str,
        account: AccountConfig,
        transport: SipTransport,
        address: str,
        timeout: float,
    ) -> None:
        self.name = name
        self.account = account
        self.transport = transport
        self.address = address
        self.timeout = timeout
        host, port, kind = account.next_hop
        self.registrar = (host, port)
        self.peer = Source(self.registrar, kind)  # REGISTER goes over its transport
        self.dialect = Dialect(
            host,
            port,
            account.username,
            account.password,
            address,
            transport.port_for(kind),
            int(account.expires),
            kind,
        )
        self.registered = asyncio.Event()
        self.registrations = 0  # successful REGISTER transactions (refreshes included)
        self.failures = 0
        self.last_error = ""
        self.last_status: int | None = None  # of the last failed REGISTER; None: no answer
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self, unregister: bool = True) -> None:
        await cancel_and_wait(self._task)
        if unregister and self.registered.is_set():
            await self._register(deregister=True)
        self.registered.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = RETRY_FIRST
        failing_since: float | None = None
        while True:
            granted = await self._register()
            if granted is None:
                self.registered.clear()
                self.failures += 1
                refused = self.last_status is not None and self.last_status < 500
                delay = backoff if refused else min(backoff, self.account.keepalive)
                if failing_since is None:  # once per outage: a dead PBX must not flood the log
                    failing_since = loop.time()
                    log.warning(
                        "SIP account %s: registration failed (%s); trying again %s",
                        self.name,
                        self.last_error,
                        "with backoff to 60s"
                        if refused
                        else f"every {self.account.keepalive:.0f}s",
                    )
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, RETRY_MAX)
                continue
            backoff = RETRY_FIRST
            if not self.registered.is_set():
                log.info(
                    "SIP account %s registered at %s:%s for %.0fs%s",
                    self.name,
                    *self.registrar,
                    granted,
                    ""
                    if failing_since is None
                    else f" (after {loop.time() - failing_since:.1f}s failing)",
                )
            failing_since = None
            self.registered.set()
            self.registrations += 1
            await asyncio.sleep(min(self.account.keepalive, max(granted / 2, 1.0)))

    async def _register(self, deregister: bool = False) -> float | None:
        """One REGISTER transaction (with the digest round); the granted expiry, or None."""
        first = self.dialect.first_register(deregister=deregister)
        response = await self.transport.request(first, self.peer, self.timeout)
        if response is not None and response.status == 401:
            answer = self.dialect.answer_challenge(response, deregister=deregister)
            response = await self.transport.request(answer, self.peer, self.timeout)
            if response is not None and response.status == 401:
                self.last_status = 401
                self.last_error = "401 again: wrong username or password"
                return None
        if response is None:
            self.last_status = None
            self.last_error = "no answer"
            return None
        status = response.status
        if status != 200:
            self.last_status = status
            self.last_error = f"{status} {response.reason}"
            return None
        return self._granted(response)

    def _granted(self, response: SipMessage) -> float:
        match = _EXPIRES.search(response.headers.get("contact"))
        if match:
            return float(match.group(1))
        expires = response.headers.get("expires")
        try:
            return float(expires) if expires else float(self.account.expires)
        except ValueError:
            return float(self.account.expires)
