"""Keep one extension registered on a PBX, whatever the PBX does.

REGISTER (pyVoIP builds it and answers the MD5 digest challenge), then refresh
at half the granted expiry. Between refreshes an OPTIONS keepalive checks that
the registrar is still there: a registrar that stopped answering and then
answers again has probably restarted and forgotten us, so we register again at
once instead of waiting for the refresh. Failures retry with backoff (1 s
doubling to 60 s) forever — pyVoIP's own loop gives up after three.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from gateway.sip.config import AccountConfig
from gateway.sip.pyvoip import Dialect, SIPMessage
from gateway.sip.transport import SipTransport, Source, new_call_id, new_tag

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
        self.peer = Source(self.registrar, kind)  # REGISTER and OPTIONS go over its transport
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
        self._task: asyncio.Task | None = None
        self._options_call_id = new_call_id(address)
        self._options_cseq = 0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self, unregister: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):  # cancelled on purpose
                await self._task
        if unregister and self.registered.is_set():
            await self._register(deregister=True)

    async def _run(self) -> None:
        backoff = RETRY_FIRST
        while True:
            granted = await self._register()
            if granted is None:
                self.registered.clear()
                self.failures += 1
                log.warning(
                    "SIP account %s: registration failed (%s); retry in %.0fs",
                    self.name,
                    self.last_error,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                continue
            backoff = RETRY_FIRST
            if not self.registered.is_set():
                log.info(
                    "SIP account %s registered at %s:%s for %.0fs",
                    self.name,
                    *self.registrar,
                    granted,
                )
            self.registered.set()
            self.registrations += 1
            await self._hold(granted)

    async def _hold(self, granted: float) -> None:
        """Wait until the refresh is due, or until the registrar comes back from an outage."""
        loop = asyncio.get_running_loop()
        refresh_at = loop.time() + max(granted / 2, 1.0)
        interval = min(self.account.keepalive, max(granted / 2, 1.0))
        lost = False
        while loop.time() < refresh_at:
            await asyncio.sleep(min(interval, max(0.0, refresh_at - loop.time())))
            if loop.time() >= refresh_at:
                return
            alive = await self._keepalive()
            if not alive and not lost:
                lost = True
                self.registered.clear()
                log.warning(
                    "SIP account %s: registrar %s:%s stopped answering", self.name, *self.registrar
                )
            elif alive and lost:
                log.info("SIP account %s: registrar is back; registering again", self.name)
                return

    async def _keepalive(self) -> bool:
        self._options_cseq += 1
        host, port = self.registrar
        user = self.account.username
        lines = [
            f"OPTIONS sip:{host}:{port} SIP/2.0",
            self.transport.via(self.peer, self.address),
            "Max-Forwards: 70",
            f"From: <sip:{user}@{host}>;tag={new_tag()}",
            f"To: <sip:{host}:{port}>",
            f"Call-ID: {self._options_call_id}",
            f"CSeq: {self._options_cseq} OPTIONS",
            "Content-Length: 0",
        ]
        response = await self.transport.request(
            "\r\n".join(lines) + "\r\n\r\n", self.peer, min(self.timeout, 4.0)
        )
        return response is not None

    async def _register(self, deregister: bool = False) -> float | None:
        """One REGISTER transaction (with the digest round); the granted expiry, or None."""
        first = self.dialect.first_register(deregister=deregister)
        response = await self.transport.request(first, self.peer, self.timeout)
        if response is not None and int(response.status) == 401:
            answer = self.dialect.answer_challenge(response, deregister=deregister)
            response = await self.transport.request(answer, self.peer, self.timeout)
            if response is not None and int(response.status) == 401:
                self.last_error = "401 again: wrong username or password"
                return None
        if response is None:
            self.last_error = "no answer"
            return None
        status = int(response.status)
        if status != 200:
            self.last_error = f"{status} {response.status.phrase}"
            return None
        return self._granted(response)

    def _granted(self, response: SIPMessage) -> float:
        contact = response.headers.get("Contact", "")
        match = _EXPIRES.search(contact if isinstance(contact, str) else "")
        if match:
            return float(match.group(1))
        expires = response.headers.get("Expires")
        try:
            return float(expires) if expires is not None else float(self.account.expires)
        except ValueError:
            return float(self.account.expires)
