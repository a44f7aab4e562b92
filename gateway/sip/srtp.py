"""SRTP for SIP legs: SDES keys in SDP (RFC 4568) and libsrtp sessions (RFC 3711).

Keys travel in the SDP itself (``a=crypto`` lines), so they are only as secret as
the signalling: :mod:`gateway.sip.calls` offers and accepts them over TLS only.
One suite, ``AES_CM_128_HMAC_SHA1_80``: the one every SDES phone and PBX speaks
(RFC 4568 §6.2.1) and the one BSI-Core profiles name. In SDES each side sends with
the key it announced, so a leg holds two libsrtp sessions: the peer's key checks
and decrypts what the peer sends, ours protects what we send.

Packets are protected and unprotected **in place in the leg bank's NumPy buffers**,
one C loop over the batch calling libsrtp per packet (:func:`protect_rows`,
:func:`unprotect_rows`, ``_rtpbatch.srtp_rows``): pylibsrtp's own ``protect()``
allocates and copies twice per packet, which at hundreds of legs costs more than the
cipher, and a Python call per packet was most of the rest at 10 ms frames. A packet
that fails its check is reported by status, never raised.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass

import numpy as np
from pylibsrtp import Policy, Session
from pylibsrtp._binding import ffi, lib

from gateway.sip import _rtpbatch

SUITE = "AES_CM_128_HMAC_SHA1_80"
KEY_LENGTH = 30  # master key (16) + master salt (14)
TAG = 10  # HMAC-SHA1-80 authentication tag after every SRTP packet
RTCP_TRAILER = 4 + TAG  # SRTCP: E flag and index, then the tag

# libsrtp 2 status codes (srtp_err_status_t) a received packet can fail with.
AUTH_FAIL = 7
REPLAY_FAIL = 9
REPLAY_OLD = 10

_CRYPTO = re.compile(r"^a=crypto:(\d{1,9})[ \t]+(\S+)[ \t]+(\S+)[ \t]*(.*?)\s*$", re.I)
_LIFETIME = re.compile(r"^(?:2\^\d{1,2}|\d{1,20})$")


@dataclass(frozen=True)
class Crypto:
    """One ``a=crypto`` line we can use: its tag and the 30-byte master key and salt."""

    tag: int
    key: bytes

    def attribute(self) -> str:
        inline = base64.b64encode(self.key).decode("ascii")
        return f"a=crypto:{self.tag} {SUITE} inline:{inline}"


def new_crypto(tag: int = 1) -> Crypto:
    """A fresh key of ours (per call, never reused)."""
    return Crypto(tag, secrets.token_bytes(KEY_LENGTH))


def parse_crypto(line: str) -> Crypto | None:
    """An ``a=crypto`` line (RFC 4568 §9.1), or None when we cannot use it.

    Refused: another suite, a key that is not exactly 30 bytes of strict base64,
    several keys or an MKI (we never rekey), and the session parameters that
    weaken SRTP (``UNENCRYPTED_SRTP``, ``UNAUTHENTICATED_SRTP``...) or that libsrtp
    is not set up for (``KDR``, ``FEC_*``). A lifetime is accepted and not enforced:
    it bounds what the peer sends with its own key, which is the peer's business
    (libsrtp refuses a key after 2^48 packets anyway). ``WSH`` is accepted.
    """
    match = _CRYPTO.match(line.strip())
    if not match:
        return None
    tag, suite, key_params, session_params = match.groups()
    if suite.upper() != SUITE or ";" in key_params:
        return None
    method, _, info = key_params.partition(":")
    if method.lower() != "inline":
        return None
    key_text, *extra = info.split("|")
    if len(extra) > 1 or (extra and not _LIFETIME.match(extra[0])):  # MKI, or junk
        return None
    if any(not p.upper().startswith("WSH=") for p in session_params.split()):
        return None
    try:
        key = base64.b64decode(key_text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(key) != KEY_LENGTH:
        return None
    return Crypto(int(tag), key)


def accept_keys(
    policy: str, transport: str, savp: bool, offered: tuple[Crypto, ...]
) -> tuple[Crypto | None, str]:
    """What an offer gets under a route's ``srtp`` policy: the peer's key to use (SRTP), no
    key (plain RTP), or a reason to refuse the call with 488 (``(None, reason)``).

    Keys are accepted only when the offer came over TLS: over UDP or TCP anyone on the
    path has read them. A ``RTP/SAVP`` offer cannot be answered with plain RTP, and
    ``required`` takes nothing else.
    """
    if policy == "off":
        return None, "SRTP is off for this route and the offer is RTP/SAVP" if savp else ""
    if transport != "tls":
        if policy == "required":
            return None, f"SRTP required, and SDES keys need TLS (this came over {transport})"
        return None, f"an SRTP offer over {transport} (SDES keys only over TLS)" if savp else ""
    if offered:
        return offered[0], ""
    if savp or policy == "required":
        return None, f"SRTP {'offered' if savp else 'required'} without a usable {SUITE} key"
    return None, ""


class LegSrtp:
    """One leg's two SRTP sessions: the peer's key for what it sends, ours for what we send.

    ``rx``/``tx`` are libsrtp contexts (``srtp_t``) for the batch calls below; the
    pylibsrtp sessions that own them are kept alive with this object, which the
    leg's :class:`~gateway.sip.bank.LegMedia` holds until hang-up.
    """

    def __init__(self, peer_key: bytes, our_key: bytes) -> None:
        self._rx_session = Session(Policy(peer_key, ssrc_type=Policy.SSRC_ANY_INBOUND))
        self._tx_session = Session(Policy(our_key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
        self.rx = self._rx_session._srtp[0]
        self.tx = self._tx_session._srtp[0]
        # ... and their addresses, for the batch's C loop (protect_rows, unprotect_rows)
        self.rx_address = int(ffi.cast("uintptr_t", self.rx))
        self.tx_address = int(ffi.cast("uintptr_t", self.tx))
        self._buffer = ffi.new("char[]", 2048)
        self._length = ffi.new("int *")

    def protect(self, packet: bytes, rtcp: bool = False) -> bytes | None:
        """One packet we send off the batch (DTMF events, RTCP reports); None if refused."""
        if len(packet) + RTCP_TRAILER > len(self._buffer):
            return None
        return self._one(lib.srtp_protect_rtcp if rtcp else lib.srtp_protect, self.tx, packet)

    def unprotect_rtcp(self, packet: bytes) -> bytes | None:
        """One SRTCP packet from the peer, checked and decrypted; None if it fails."""
        if len(packet) > len(self._buffer):
            return None
        return self._one(lib.srtp_unprotect_rtcp, self.rx, packet)

    def _one(self, call, ctx, packet: bytes) -> bytes | None:  # noqa: ANN001 - cffi objects
        self._buffer[0 : len(packet)] = packet
        self._length[0] = len(packet)
        if call(ctx, self._buffer, self._length) != 0:
            return None
        return ffi.buffer(self._buffer, self._length[0])[:]


# libsrtp's calls as addresses, for the C loop over a batch (_rtpbatch.srtp_rows): the
# library is pylibsrtp's own, already loaded; the contexts are LegSrtp's. The C loop
# calls them as libsrtp 2 declares them; libsrtp 3 changed these calls, so a pylibsrtp
# built on another signature is refused here rather than called wrongly.
_SIGNATURE = "srtp_err_status_t(*)(struct srtp_ctx_t_ *, void *, int *)"


def _address(name: str) -> int:
    call = ffi.addressof(lib, name)
    if ffi.typeof(call).cname != _SIGNATURE:
        raise ImportError(
            f"pylibsrtp's {name} is {ffi.typeof(call).cname}, not libsrtp 2's {_SIGNATURE}:"
            " install a pylibsrtp built on libsrtp 2 (pyproject.toml pins pylibsrtp<2)"
        )
    return int(ffi.cast("uintptr_t", call))


_PROTECT = _address("srtp_protect")
_UNPROTECT = _address("srtp_unprotect")
_UNPROTECT_RTCP = _address("srtp_unprotect_rtcp")


def protect_rows(
    packets: np.ndarray, which: np.ndarray, contexts: np.ndarray, length: int | np.ndarray
) -> np.ndarray:
    """SRTP-protect rows ``which`` of ``packets`` in place; their new lengths (0: refused).

    ``packets`` is C-contiguous uint8 with at least ``TAG`` spare bytes after
    ``length`` (one for all, or one per row of ``which``) in every row;
    ``contexts[i]`` is the sending context's address (``LegSrtp.tx_address``) of row
    ``which[i]``.
    """
    count = len(which)
    lengths = np.empty(count, np.int64)
    lengths[:] = length
    status = np.empty(count, np.int64)
    _rtpbatch.srtp_rows(
        (_PROTECT, _PROTECT),
        np.zeros(count, np.uint8),
        packets,
        packets.shape[1],
        np.ascontiguousarray(which, np.int64),
        np.ascontiguousarray(contexts, np.int64),
        lengths,
        status,
        TAG,
    )
    return np.where(status == 0, lengths, 0)


def unprotect_rows(
    data: np.ndarray, which: np.ndarray, contexts: np.ndarray, length: np.ndarray, rtcp: np.ndarray
) -> np.ndarray:
    """Check and decrypt rows ``which`` of a receive buffer in place.

    ``length[which]`` is updated to the plain packet's length; ``rtcp`` says which
    of them are SRTCP (RTCP multiplexed on the RTP port); ``contexts[i]``: the
    receiving context's address (``LegSrtp.rx_address``). Returns libsrtp's status
    per packet (0: good; :data:`AUTH_FAIL`, :data:`REPLAY_FAIL`... otherwise).
    """
    sizes = length[which]
    status = np.empty(len(which), np.int64)
    _rtpbatch.srtp_rows(
        (_UNPROTECT, _UNPROTECT_RTCP),
        np.ascontiguousarray(rtcp, np.uint8),
        data,
        data.shape[1],
        np.ascontiguousarray(which, np.int64),
        np.ascontiguousarray(contexts, np.int64),
        sizes,
        status,
        0,
    )
    length[which] = sizes
    return status
