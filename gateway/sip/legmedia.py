"""One SIP leg's media state that is not a per-tick column: addresses, DTMF, keys, rare counters.

The call manager fills one in for each call and hands it to the leg bank
(:class:`gateway.sip.bank.LegBank`), whose parts read it by row; it sits apart from
the bank so that those parts can name it without importing the bank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.sip.rtcp import RtcpState
from gateway.sip.srtp import LegSrtp


@dataclass
class LegMedia:
    """One leg's RTP state that is not a per-tick array: addresses, DTMF, rare counters."""

    payload_type: int  # the agreed codec's number on the wire (Opus: a dynamic one)
    dtmf_type: int | None
    remote: tuple[str, int] | None  # where the SDP says the peer's RTP is
    ssrc: int | None = None  # our SSRC for this call (announced in our SDP); None: pick one
    announced: tuple[int, ...] = ()  # the SSRCs the peer's SDP announced (a=ssrc)
    offered: tuple[str, int] | None = None  # the SDP's address, kept when `remote` latches
    on_dtmf: Callable[[str, bool], None] | None = None
    rtcp: RtcpState = field(default_factory=lambda: RtcpState(None))
    malformed: int = 0
    send_errors: int = 0
    event_ts: int | None = None  # RTP timestamp of the DTMF event being received
    event_ended: bool = True
    dtmf_out: list[str] = field(default_factory=list)
    dtmf_sending: tuple[str, int, int] | None = None  # digit, start ts, samples sent
    srtp: LegSrtp | None = None  # the call's SRTP keys (SDES over TLS), else plain RTP
    group: tuple[str, str] = ("", "")  # (route, talkgroup) its figures are counted under
    on_extension: Callable[[bytes], None] | None = None  # a received header extension block
    codec: int | None = None  # PCMU, PCMA or OPUS (gateway.sip.rtp); None: payload_type's own
