"""The one seam to pyVoIP 1.6.8: its REGISTER builder and MD5 digest.

pyVoIP is the design card's choice for SIP registration, but its threads must stay
out of the audio and its transport out of the event loop. So it is used as a
*message library* only — :class:`Dialect` subclasses ``SIPClient`` and is never
``start()``-ed — and the gateway owns the sockets, transactions and media. Messages
the gateway receives are read once by :mod:`gateway.sip.message`, not by pyVoIP
(whose parser needed a rewrite of every header block first and still dropped
repeated headers); pyVoIP's dictionary shapes stay in this module. Each pyVoIP
shortcoming is worked around here or where noted:

* Circular import: ``pyVoIP.VoIP`` must be imported before ``pyVoIP.SIP``.
* Its receive thread polls with 10 ms sleeps and its ``register()`` blocks for
  up to 30 s holding the socket lock, then stops the client for good after three
  failures (so a registrar restart would end registration): not used; the
  registration loop in :mod:`gateway.sip.registration` retries with backoff.
* Its answer to a 401 reads the challenge from its own parsed message:
  :class:`_Challenge` hands it the realm, nonce, Call-ID and CSeq in its shapes.
* Call-IDs come from a per-client counter (two accounts collide): replaced.
* Its REGISTER says ``SIP/2.0/UDP`` in Via and ``transport=UDP`` in Contact:
  :class:`Dialect` rewrites both for the account's transport (the digest ``uri``
  keeps pyVoIP's text: it is hashed as written, so the registrar still agrees).
* Its REGISTER's Allow lists the methods it knows: OPTIONS and INFO are added.
* Still missing and not worked around: digest ``qop=auth``, 407 proxy
  challenges, IPv6.
"""

from __future__ import annotations

import secrets
from typing import Any

import pyVoIP
import pyVoIP.VoIP  # noqa: F401  (must come before pyVoIP.SIP: circular import in 1.6.8)
from pyVoIP.SIP import SIPClient

from gateway.sip.digest import parse_authorization
from gateway.sip.message import SipMessage

for _method in ("OPTIONS", "INFO"):  # what the REGISTER's Allow says the gateway answers
    if _method not in pyVoIP.SIPCompatibleMethods:
        pyVoIP.SIPCompatibleMethods.append(_method)


class _NoPhone:
    """SIPClient writes a status on its phone; the gateway has no VoIPPhone."""

    _status = None


class Dialect(SIPClient):
    """pyVoIP's message builders for one account, without its socket or threads."""

    def __init__(
        self,
        server: str,
        port: int,
        username: str,
        password: str,
        my_ip: str,
        my_port: int,
        expires: int,
        transport: str = "udp",
    ) -> None:
        super().__init__(
            server, port, username, password, phone=_NoPhone(), myIP=my_ip, myPort=my_port
        )
        self.default_expires = expires
        self.transport = transport

    def gen_call_id(self) -> str:
        """pyVoIP hashes a per-client counter, so two accounts send the same Call-ID and
        their transactions collide; a random one is unique across accounts."""
        return f"{secrets.token_hex(16)}@{self.myIP}:{self.myPort}"

    def first_register(self, deregister: bool = False) -> str:
        return self._over_transport(self.gen_first_response(deregister=deregister))

    def answer_challenge(self, challenge: SipMessage, deregister: bool = False) -> str:
        """REGISTER with an Authorization built from a 401's WWW-Authenticate (MD5, no qop)."""
        pyvoip_shaped: Any = _Challenge(challenge)
        return self._over_transport(self.gen_register(pyvoip_shaped, deregister=deregister))

    def _over_transport(self, request: str) -> str:
        """pyVoIP writes UDP into Via and Contact; say the transport the request goes over."""
        if self.transport == "udp":
            return request
        request = request.replace("Via: SIP/2.0/UDP ", f"Via: SIP/2.0/{self.transport.upper()} ", 1)
        return request.replace(";transport=UDP>", f";transport={self.transport}>", 1)

    def start(self) -> None:  # pragma: no cover - guard
        raise RuntimeError("Dialect is a message builder; the gateway owns the socket")


class _Challenge:
    """What pyVoIP's ``gen_register`` reads of a 401, in the shapes of its own parser."""

    def __init__(self, response: SipMessage) -> None:
        params = parse_authorization(response.headers.get("www-authenticate")) or {}
        self.authentication = {"realm": params.get("realm", ""), "nonce": params.get("nonce", "")}
        self.headers = {
            "Call-ID": response.call_id,
            "CSeq": {"check": str(response.cseq), "method": response.cseq_method},
        }


__all__ = ["Dialect"]
