"""SDP offer/answer (RFC 3264) for one audio stream (G.711, or Opus on links) plus
telephone-events.

Only what a voice leg needs: pick the first codec of the offer we also speak,
find the telephone-event payload type at 8 kHz, read the SDES keys of SRTP
(``a=crypto``, RFC 4568, in the audio section), and describe our RTP socket.
Every call of the gateway leaves from the same RTP port, so each description
names the call's own SSRC (``a=ssrc``, RFC 5576): a peer that reads it, such as
another BorderLink, tells our calls apart by SSRC; one that announces its own
SSRCs is told apart the same way here.

Opus (RFC 7587) is offered only by links, as ``opus/48000/2`` at payload type
:data:`~gateway.sip.opus.OPUS` with in-band FEC and a 16 kHz playback rate (the
engine's). Opus has no static payload type: a peer may give it any dynamic one
(96-127), and RFC 3264 §6.1 has the answer use the offer's number, so an offer's
Opus is recognised at any of them and :attr:`MediaOffer.opus_type` keeps the number
the call sends and expects (:func:`payload_type`). Elsewhere a codec is named by
its static number (:data:`NAMES`; Opus by ours, 111).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from gateway.sip.message import SipMessage
from gateway.sip.opus import FMTP
from gateway.sip.rtp import CODEC_NAMES, OPUS, PCMA, PCMU
from gateway.sip.srtp import Crypto, parse_crypto

NAMES = {"pcmu": PCMU, "pcma": PCMA, "opus": OPUS}
PTIME = 20  # ms: a=ptime when a description has none (RFC 7587's and most phones' packet time)
DTMF_TYPE = 101
AVP = "RTP/AVP"
SAVP = "RTP/SAVP"  # SRTP (RFC 3711 §12): the answer must carry keys or the call fails
_RTCP_PORT = re.compile(r"^a=rtcp:(\d{1,5})", re.M)
_RTCP_MUX = re.compile(r"^a=rtcp-mux\s*$", re.M)
_DIRECTION = re.compile(r"^a=(sendrecv|sendonly|recvonly|inactive)\s*$", re.M | re.I)
_SSRC = re.compile(r"^a=ssrc:(\d{1,10})(?:\s|$)", re.M)
_PTIME = re.compile(r"^a=ptime:(\d{1,4})\s*$", re.M)
_EXTMAP = re.compile(r"^a=extmap:(\d{1,3})(?:/\w+)?[ \t]+(\S{1,200})[ \t]*([^\r\n]{0,200})", re.M)
# The first audio stream (m=audio PORT[/COUNT] PROTO FORMATS), the first address (c=) and
# the payload types' names and clock rates (a=rtpmap): all a leg needs of SDP (RFC 4566).
_AUDIO = re.compile(r"^m=audio[ \t]+(?P<port>\d{1,5})(?:/\d+)?[ \t]+\S+(?P<formats>[ \t\d]*)", re.M)
_CONNECTION = re.compile(r"^c=IN[ \t]+IP[46][ \t]+(?P<address>[^/\s]+)", re.M)
_RTPMAP = re.compile(r"^a=rtpmap:(\d{1,3})[ \t]+([^/\s]+)/(\d+)", re.M)
_IPV4 = re.compile(r"^(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)$")


@dataclass(frozen=True)
class MediaOffer:
    address: str
    port: int
    payload_types: list[int]
    dtmf_type: int | None
    rtcp_port: int | None = None  # a=rtcp (RFC 3605); None: RTP port + 1
    rtcp_mux: bool = False  # a=rtcp-mux (RFC 5761): RTCP on the RTP port
    profile: str = AVP  # the m= line's transport: RTP/AVP or RTP/SAVP
    crypto: tuple[Crypto, ...] = ()  # a=crypto lines we can use, in the offerer's order
    crypto_lines: int = 0  # a=crypto lines in all (usable or not)

    @property
    def savp(self) -> bool:
        return self.profile.upper() == SAVP

    ssrcs: tuple[int, ...] = ()  # a=ssrc (RFC 5576): the SSRCs the peer says it sends

    @property
    def usable(self) -> bool:
        """An IPv4 literal and a real port: something RTP can be sent to (no hold, no names)."""
        return (
            bool(_IPV4.match(self.address))
            and self.address != "0.0.0.0"
            and 0 < self.port < 65535
            and (self.rtcp_port is None or 0 < self.rtcp_port <= 65535)
        )

    direction: str = "sendrecv"  # a=sendrecv|sendonly|recvonly|inactive (RFC 3264), writer's view
    # a=extmap (RFC 8285): (ID 1-255, URI, the extension's attributes after the URI)
    extmaps: tuple[tuple[int, str, str], ...] = ()
    opus_type: int = OPUS  # the dynamic payload type the writer gave opus/48000/2
    ptime: int = PTIME  # a=ptime (ms): the packet time the writer sends (RFC 4566; default 20)

    def extension(self, uri: str) -> tuple[int, str] | None:
        """(ID, attributes) the writer gave the RTP header extension ``uri``; None: not in it."""
        return next(((n, attrs) for n, name, attrs in self.extmaps if name == uri), None)


def read_offer(message: SipMessage) -> MediaOffer | None:
    """The audio stream of a message's SDP body, or None when there is none.

    Never raises: a body that is not SDP, or SDP without an audio stream and an
    address to send it to, is no offer."""
    if message.content_type != "application/sdp":
        return None
    text = message.text()
    audio = _AUDIO.search(text)
    address = _CONNECTION.search(text)
    if audio is None or address is None:
        return None
    rtpmaps = {pt: (name.lower(), rate) for pt, name, rate in _RTPMAP.findall(text)}
    payload_types: list[int] = []
    dtmf = None
    opus_type = OPUS
    for pt_text in audio["formats"].split():
        if not pt_text.isdigit() or len(pt_text) > 3:
            continue
        pt = int(pt_text)
        rtpmap = rtpmaps.get(pt_text)
        name, rate = rtpmap or (CODEC_NAMES.get(pt, "").lower(), "")
        if name == "telephone-event" and (not rtpmap or rate == "8000"):
            dtmf = pt
        elif name == "opus":
            dynamic = 96 <= pt <= 127 and bool(rtpmap) and rate == "48000"
            if dynamic and OPUS not in payload_types:  # the first Opus the writer lists
                payload_types.append(OPUS)
                opus_type = pt
        elif name in NAMES and (pt < 96 or rtpmap):
            payload_types.append(NAMES[name] if pt >= 96 else pt)
    rtcp = _RTCP_PORT.search(text)
    ptime = _PTIME.search(text)
    profile, crypto_lines = _audio_section(text)
    crypto = tuple(c for c in map(parse_crypto, crypto_lines) if c is not None)
    directions = _DIRECTION.findall(text)  # the last one (media level) wins over the session's
    ssrcs = tuple(dict.fromkeys(int(m) for m in _SSRC.findall(text) if int(m) < 1 << 32))
    extmaps = tuple(
        (int(n), uri, attrs.strip())
        for n, uri, attrs in _EXTMAP.findall(text)
        if 1 <= int(n) <= 255
    )
    return MediaOffer(
        address["address"],
        int(audio["port"]),
        payload_types,
        dtmf,
        int(rtcp.group(1)) if rtcp else None,
        bool(_RTCP_MUX.search(text)),
        profile,
        crypto,
        len(crypto_lines),
        ssrcs,
        direction=directions[-1].lower() if directions else "sendrecv",
        extmaps=extmaps[:16],
        opus_type=opus_type,
        ptime=int(ptime.group(1)) if ptime else PTIME,
    )


def _audio_section(text: str) -> tuple[str, list[str]]:
    """The first audio m= line's transport and its ``a=crypto`` lines (media-level only)."""
    profile, lines, inside = AVP, [], False
    for line in text.splitlines():
        if line.startswith("m="):
            if inside:
                break
            fields = line[2:].split()
            inside = len(fields) >= 3 and fields[0] == "audio"
            if inside:
                profile = fields[2]
        elif inside and line[:9].lower() == "a=crypto:":
            lines.append(line)
    return profile, lines


def choose_codec(offer: MediaOffer, ours: list[str], ptime: int = PTIME) -> int | None:
    """The first codec of the offer that the site allows (the offerer's preference wins).

    Opus only when the peer's packet time is ours (``ptime``, the engine's frame): each
    side sends one packet a tick and plays one a tick, so a 10 ms gateway and a 20 ms one
    agree on G.711 instead (its receiver takes packets of any length)."""
    allowed = {NAMES[c] for c in ours}
    if offer.ptime != ptime:
        allowed.discard(OPUS)
    return next((pt for pt in offer.payload_types if pt in allowed), None)


def payload_type(offer: MediaOffer, codec: int) -> int:
    """The number ``codec`` goes by on the wire in a call agreed on ``offer`` (the writer's
    dynamic one for Opus, RFC 3264 §6.1; a static one is its own)."""
    return offer.opus_type if codec == OPUS else codec


def describe(
    address: str,
    port: int,
    payload_types: list[int],
    dtmf_type: int | None,
    session_id: int | None = None,
    rtcp_mux: bool = False,
    profile: str = AVP,
    crypto: Crypto | None = None,
    direction: str = "sendrecv",
    ssrc: int | None = None,
    cname: str = "",
    version: int | None = None,
    extmap: tuple[int, str] | None = None,
    opus_type: int = OPUS,
    ptime: int = PTIME,
) -> str:
    """Our SDP: offer or answer. ``opus_type``: the payload type Opus goes by (in an
    answer, the offer's); ``ptime``: our packet time in ms (the engine's frame);
    ``crypto``: our SDES key (only ever sent over TLS);
    ``ssrc``/``cname``: the SSRC the call's RTP carries (RFC 5576); ``extmap``: an RTP
    header extension (ID, "URI [attributes]") in the two-byte form (RFC 8285
    ``a=extmap-allow-mixed``)."""
    session = session_id if session_id is not None else random.getrandbits(31)
    version = session if version is None else version
    numbers = [opus_type if pt == OPUS else pt for pt in payload_types]
    formats = [*numbers, *([dtmf_type] if dtmf_type is not None else [])]
    lines = [
        "v=0",
        f"o=borderlink {session} {version} IN IP4 {address}",
        "s=BorderLink",
        f"c=IN IP4 {address}",
        "t=0 0",
        f"m=audio {port} {profile} {' '.join(str(f) for f in formats)}",
    ]
    for pt in payload_types:
        if pt == OPUS:
            n = opus_type
            lines += [f"a=rtpmap:{n} opus/48000/2", f"a=fmtp:{n} {FMTP}"]
        else:
            lines.append(f"a=rtpmap:{pt} {CODEC_NAMES[pt]}/8000")
    if dtmf_type is not None:
        lines += [f"a=rtpmap:{dtmf_type} telephone-event/8000", f"a=fmtp:{dtmf_type} 0-15"]
    if crypto is not None:
        lines.append(crypto.attribute())
    lines += [f"a=ptime:{ptime}", f"a={direction}"]
    if extmap is not None:
        lines += [f"a=extmap:{extmap[0]} {extmap[1]}", "a=extmap-allow-mixed"]
    if rtcp_mux:  # only in an answer to an offer that asked for it
        lines.append("a=rtcp-mux")
    if ssrc is not None:
        lines.append(f"a=ssrc:{ssrc} cname:{cname or 'borderlink'}")
    return "\r\n".join(lines) + "\r\n"
