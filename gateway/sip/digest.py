"""Digest authentication of callers (server side): RFC 3261 §22 with RFC 2617/7616 MD5.

The gateway challenges an INVITE with ``401`` and ``WWW-Authenticate`` offering
``qop="auth"``; it accepts answers with ``qop=auth`` and without (RFC 2069 style,
what many PBXs and pyVoIP send). Only MD5: it is what SIP phones speak.

Nonces are stateless: ``milliseconds.hmac(key, milliseconds:source address)`` — nothing is stored
per challenge, so a stranger's INVITE flood allocates nothing here. A nonce expires
after :data:`NONCE_LIFETIME` (an expired one earns a fresh challenge with
``stale=true``, as RFC 2617 says) and only works from the address it was given to.
A proven answer is remembered until its nonce expires (a bounded table): the same
answer on another call is a replay and gets a new challenge.

Passwords are never in the site file: each user's ``HA1 = MD5(user:realm:password)``
is (what kamailio keeps in its ``ha1`` column); ``borderlink passwd --sip USER``
prints it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.request import parse_http_list, parse_keqv_list

NONCE_LIFETIME = 30.0  # seconds: a phone answers a challenge at once
REPLAY_TABLE = 4096  # remembered answers (only proven ones: a stranger cannot fill it)


def md5_hex(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()  # noqa: S324 - SIP digest is MD5


def ha1(user: str, realm: str, password: str) -> str:
    """What the site file stores for a digest user: MD5(user:realm:password)."""
    return md5_hex(f"{user}:{realm}:{password}")


def parse_authorization(value: str) -> dict[str, str] | None:
    """The parameters of a ``Digest`` Authorization header, or None if it is not one."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest" or not rest:
        return None
    try:
        params = parse_keqv_list(parse_http_list(rest))
    except (ValueError, IndexError):  # an item without '=', or 'key=' with nothing after
        return None
    return {k.strip().lower(): v for k, v in params.items()}


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking an INVITE's credentials."""

    user: str = ""  # the proven digest user; "" when not proven
    challenge: bool = False  # answer 401 with a (new) challenge
    stale: bool = False  # ... saying the old nonce merely expired
    failed: str = ""  # why credentials were refused (wrong user or password): answer 403


class DigestAuth:
    """Challenges and checks for one realm; nonces valid for one source address."""

    def __init__(self, realm: str, now=time.time) -> None:  # noqa: ANN001 - a clock
        self.realm = realm
        self.now = now
        self._key = secrets.token_bytes(32)  # per run: a restart invalidates old nonces
        self._answers: OrderedDict[str, tuple[str, float]] = OrderedDict()

    # --- nonces -----------------------------------------------------------------------

    def _mac(self, stamp: str, host: str) -> str:
        return hmac.new(self._key, f"{stamp}:{host}".encode(), hashlib.sha256).hexdigest()[:32]

    def nonce(self, host: str) -> str:
        stamp = str(int(self.now() * 1000))  # milliseconds
        return f"{stamp}.{self._mac(stamp, host)}"

    def _nonce_state(self, nonce: str, host: str) -> str:
        """'ok', 'stale' (ours but expired) or 'bad' (not ours, or for another address)."""
        stamp, _, mac = nonce.partition(".")
        if not mac or not hmac.compare_digest(mac, self._mac(stamp, host)):
            return "bad"
        try:
            age = self.now() - int(stamp) / 1000
        except ValueError:
            return "bad"
        return "ok" if -1.0 <= age <= NONCE_LIFETIME else "stale"

    def www_authenticate(self, host: str, stale: bool = False) -> str:
        """The ``WWW-Authenticate`` header of a 401 for a request from ``host``."""
        value = (
            f'WWW-Authenticate: Digest realm="{self.realm}", nonce="{self.nonce(host)}", '
            'algorithm=MD5, qop="auth"'
        )
        return value + (", stale=true" if stale else "")

    # --- checking an answer -----------------------------------------------------------

    def check(
        self,
        authorization: str | None,
        method: str,
        host: str,
        call_id: str,
        users: dict[str, str],
    ) -> Verdict:
        """Check the Authorization header of a request against ``users`` (user → HA1)."""
        if not authorization:
            return Verdict(challenge=True)
        params = parse_authorization(authorization)
        if params is None:
            return Verdict(challenge=True)
        user = params.get("username", "")
        nonce = params.get("nonce", "")
        uri = params.get("uri", "")
        response = params.get("response", "").lower()
        if params.get("realm") != self.realm or not nonce or not uri or not response:
            return Verdict(challenge=True)
        if params.get("algorithm", "MD5").upper() != "MD5":
            return Verdict(challenge=True)
        state = self._nonce_state(nonce, host)
        if state != "ok":
            return Verdict(challenge=True, stale=state == "stale")
        stored = users.get(user)
        # An unknown user is checked against a made-up hash: same work, same answer.
        expected_ha1 = stored if stored is not None else md5_hex(secrets.token_hex(8))
        ha2 = md5_hex(f"{method}:{uri}")
        qop = params.get("qop", "")
        if qop:
            nc, cnonce = params.get("nc", ""), params.get("cnonce", "")
            if qop.lower() != "auth" or not nc or not cnonce:
                return Verdict(challenge=True)
            expected = md5_hex(f"{expected_ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
        else:
            expected = md5_hex(f"{expected_ha1}:{nonce}:{ha2}")
        if stored is None or not hmac.compare_digest(expected, response):
            return Verdict(failed="wrong user or password")
        if not self._first_use(response, call_id):
            return Verdict(challenge=True)  # a replayed answer: prove it again, freshly
        return Verdict(user=user)

    def _first_use(self, response: str, call_id: str) -> bool:
        """True unless this answer already admitted another call (a replay)."""
        now = self.now()
        answers = self._answers
        while answers:
            oldest, (_, expires) = next(iter(answers.items()))
            if expires > now and len(answers) < REPLAY_TABLE:
                break
            del answers[oldest]
        seen = answers.get(response)
        if seen is not None:
            return seen[0] == call_id  # the same call retransmitting is no replay
        answers[response] = (call_id, now + NONCE_LIFETIME + 1.0)
        return True


# --- borderlink passwd --sip USER ---------------------------------------------------------


def sip_user_line(user: str, realm: str, password: str) -> str:
    """The line for ``[sip.routes."NUMBER".users]`` (``borderlink passwd --sip USER``)."""
    if '"' in user or ":" in user or not user:
        raise ValueError("a digest user name must not be empty or hold '\"' or ':'")
    return f'"{user}" = "{ha1(user, realm, password)}"'
