"""Gateways joined by links on loopback, for the trunk tests: PKI, site files, test radios.

Each site is a real Gateway (engine, clock, SIP over TLS, the links service) built
from a TOML file on disk (so the CLI's control socket and the cut state file sit
next to it), with radios the test keys and listens to by hand:
``test_link_radio`` speaks its tone while ``speaking`` is set and keeps what it
heard (full duplex, so a radio that talks would hear its own voice come back
round a loop).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sip"))

from gateway.codecs.tones import ToneGenerator  # noqa: E402
from sip_peers import band_db, dominant_hz  # noqa: E402,F401  (re-exported)

from gateway.config import PortConfig, load_config  # noqa: E402
from gateway.demo.pki import Authority, Issued  # noqa: E402
from gateway.endpoints import ENDPOINTS, Endpoint  # noqa: E402
from gateway.ports import Frame, Port  # noqa: E402
from tests import waiting
from tests.conftest import free_port  # noqa: E402

RATE = 16000


class LinkRadioConfig(PortConfig):
    tone_hz: float = Field(1000.0, gt=0, lt=RATE / 2)
    level_dbfs: float = -20.0
    # A seeded noise (300-3400 Hz) under the tone, so a listener's audio can be
    # cross-correlated with what this radio sent: each copy of it is one peak at its
    # delay, with its level (0: none)
    signature: int = 0
    signature_dbfs: float = -32.0


SIGNATURE_SECONDS = 8  # the noise repeats after this: far longer than any delay looked for


def signature_noise(seed: int, level_dbfs: float) -> np.ndarray:
    """The radio's noise signature: white noise band-passed to 300-3400 Hz (through G.711)."""
    n = SIGNATURE_SECONDS * RATE
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    hz = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[(hz < 300) | (hz > 3400)] = 0
    for tone in (1000.0, 1500.0, 2200.0, 480.0, 620.0):  # the tests' tones stay clean
        spectrum[np.abs(hz - tone) < 50] = 0
    noise = np.fft.irfft(spectrum, n)
    noise *= 10 ** (level_dbfs / 20) / np.sqrt(np.mean(noise**2))
    return noise.astype(np.float32)


class LinkRadio(Port):
    def __init__(self, name: str, config: LinkRadioConfig, timing) -> None:  # noqa: ANN001
        super().__init__(name, config, timing)
        self.tone = ToneGenerator([config.tone_hz], timing.rate, config.level_dbfs)
        self.speaking = False
        self.emergency = False  # the radio's emergency button (the floor reads it)
        self.heard: collections.deque[np.ndarray] = collections.deque(maxlen=200)  # 4 s
        self.sent: collections.deque[np.ndarray] = collections.deque(maxlen=200)  # 4 s
        self.noise = (
            signature_noise(config.signature, config.signature_dbfs) if config.signature else None
        )
        self._at = 0

    def read(self) -> Frame | None:
        self.talking = self.speaking
        n = self.frame_samples
        frame = self.tone.read(n) if self.speaking else None
        if frame is not None and self.noise is not None:
            frame = frame + self.noise[self._at : self._at + n]
            self._at = (self._at + n) % len(self.noise)
        self.sent.append(np.zeros(n, np.float32) if frame is None else frame)
        return frame

    def write(self, frame: Frame | None) -> None:
        # a copy: the engine hands out a view of its mix buffer, refilled every tick
        self.heard.append(
            np.zeros(self.frame_samples, np.float32) if frame is None else frame.copy()
        )

    def recent(self, seconds: float, sent: bool = False) -> np.ndarray:
        frames = list(self.sent if sent else self.heard)[-round(seconds / 0.02) :]
        return np.concatenate(frames) if frames else np.zeros(0, np.float32)

    def level(self, hz: float, seconds: float = 1.0) -> float:
        return band_db(self.recent(seconds), RATE, hz)


TEST_ENDPOINTS = (
    *ENDPOINTS,
    Endpoint("test radio", ports={"test_link_radio": (LinkRadioConfig, LinkRadio)}),
)


@dataclass
class Pki:
    """One CA per country (its agency's), and each site's certificate from its own CA."""

    cas: dict[str, Authority]
    certs: dict[str, Issued]


def make_pki(folder: Path, sites: tuple[str, ...]) -> Pki:
    cas = {s: Authority(folder / f"ca-{s}", f"{s.upper()} Agency CA") for s in sites}
    certs = {s: cas[s].issue(f"{s}.link.test") for s in sites}
    return Pki(cas, certs)


@dataclass
class LinkSpec:
    name: str  # the link's name on this side
    peer: str  # the peer site's name
    share: dict[str, str] = field(default_factory=dict)  # local talkgroup → 'as' or table


@dataclass
class SiteSpec:
    name: str
    tones: dict[str, float]  # talkgroup → the tone its radio speaks
    links: list[LinkSpec]
    tls_port: int = field(default_factory=lambda: _unused_port())
    sip_port: int = 0  # UDP; 0: any (a proxy in front needs to know it)
    floor: str = "mix"  # every talkgroup's floor
    agency: str = ""  # every radio's agency
    labels: dict[str, str] = field(default_factory=dict)  # talkgroup → its radio's label
    listeners: tuple[str, ...] = ()  # talkgroups with a second radio "<tg>-ear" that listens
    relay: tuple[str, ...] = ()  # [links] relay: talkgroups relayed between the links
    codecs: tuple[str, ...] = ()  # every link's codecs (default: the link's default)
    signature: int = 0  # each talking radio's noise signature seed (LinkRadioConfig)


_handed_out: set[int] = set()


def _unused_port() -> int:
    """A free port not given to another site of this test run (free_port alone may give
    the same one twice before either is bound)."""
    for _ in range(50):
        port = free_port()
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no unused port")


def with_frame(text: str, frame: str) -> str:
    """A site file whose engine runs at ``frame`` ("10ms"; "": the default)."""
    return text.replace("[timing]\n", f'[timing]\nframe = "{frame}"\n') if frame else text


def site_toml(
    folder: Path, spec: SiteSpec, ports: dict[str, int], pki: Pki, extra: str = "", sip: str = ""
) -> Path:
    """The site's TOML file; ``sip`` adds keys to ``[sip]``, ``extra`` adds tables at the end."""
    cert = pki.certs[spec.name]
    text = f"""
[site]
name = "{spec.name}"
country = "CA"

[timing]
rate = {RATE}

[audit]
path = "{folder / f"{spec.name}-audit.jsonl"}"

[sip]
listen = "127.0.0.1:{spec.sip_port}"
listen_tls = "127.0.0.1:{spec.tls_port}"
tls_certificate = "{cert.certificate}"
tls_key = "{cert.key}"
{sip}
[links]
site_id = "{spec.name}"
relay = {list(spec.relay)!r}
""".replace("'", '"')
    signature = f"signature = {spec.signature}\n" if spec.signature else ""
    for tg, hz in spec.tones.items():
        members = [f"{tg}-radio", *([f"{tg}-ear"] if tg in spec.listeners else [])]
        for member in members:
            text += f"""
[ports.{member}]
kind = "test_link_radio"
tone_hz = {hz}
{signature if member.endswith("-radio") else ""}agency = "{spec.agency}"
label = "{spec.labels.get(tg, "") if member.endswith("-radio") else ""}"
"""
        text += f"""
[talkgroups.{tg}]
members = {members!r}
floor = "{spec.floor}"
""".replace("'", '"')
    for link in spec.links:
        text += f"""
[links.{link.name}]
peer = "127.0.0.1:{ports[link.peer]}"
peer_name = "{link.peer}.link.test"
certificate = "{cert.certificate}"
key = "{cert.key}"
peer_ca = "{pki.cas[link.peer].bundle}"
{f"codecs = {list(spec.codecs)!r}".replace("'", '"') if spec.codecs else ""}

[links.{link.name}.share]
"""
        for tg, shared in link.share.items():
            text += f"{tg} = {shared}\n" if shared.startswith("{") else f'{tg} = "{shared}"\n'
    path = folder / f"{spec.name}.toml"
    path.write_text(text + extra)
    return path


@contextlib.asynccontextmanager
async def running(path: Path, endpoints: tuple = ()) -> AsyncIterator:
    """A Gateway from ``path`` on this loop, until the block ends (``endpoints``: the
    table its file is read with; by default the built-in one and the test radio)."""
    from gateway.app import Gateway

    gateway = Gateway(load_config(path, endpoints or TEST_ENDPOINTS))
    task = asyncio.ensure_future(gateway.run())
    try:
        await waiting.until(
            lambda: task.done() or _started(gateway), 10, "the links service to start"
        )
        if task.done():
            task.result()
        yield gateway
    finally:
        gateway.stop()
        await asyncio.wait_for(task, 10)


def _started(gateway) -> bool:  # noqa: ANN001
    links = gateway.links
    return links is not None and all(t._tasks for t in links.trunks.values())  # noqa: SLF001


def radio(gateway, talkgroup: str) -> LinkRadio:  # noqa: ANN001
    return gateway.ports[f"{talkgroup}-radio"]


def ear(gateway, talkgroup: str) -> LinkRadio:  # noqa: ANN001
    """The talkgroup's second radio, which only listens (SiteSpec.listeners)."""
    return gateway.ports[f"{talkgroup}-ear"]


def share_state(gateway, link: str, shared: str) -> str:  # noqa: ANN001
    return gateway.links.trunks[link].names[shared].state


def link_legs(gateway) -> list[str]:  # noqa: ANN001
    return [p.name for p in gateway.engine.ports if p.kind == "link"]


def srtp_legs(gateway) -> list[bool]:  # noqa: ANN001
    """For each link leg: is its media SRTP (keys agreed over the link's TLS)?"""
    return [bool(p.bank.table.srtp[p.row]) for p in gateway.engine.ports if p.kind == "link"]


def link_leg(gateway):  # noqa: ANN001, ANN201
    """The gateway's one link leg, or None (none, or several)."""
    legs = [p for p in gateway.engine.ports if p.kind == "link"]
    return legs[0] if len(legs) == 1 else None


def _point(leg, address: tuple[str, int], latch: bool) -> None:  # noqa: ANN001
    """Send the leg's RTP to ``address`` from now on (what a re-INVITE moving the media
    does); with ``latch``, listen for whoever answers from its host (a peer behind NAT),
    else only to ``address``. Its RTCP stays where it was."""
    bank, row = leg.bank, leg.row
    media = bank.table.media[row]
    rtcp = media.rtcp.remote
    bank.move(
        row,
        media,
        address,
        media.rtcp,
        media.payload_type,
        media.dtmf_type,
        media.announced,
        media.codec,
    )
    bank.rtcp.set_remote(row, rtcp)
    bank.table.latched[row] = not latch


async def media_through(ours, theirs, relay) -> None:  # noqa: ANN001
    """Put one link dialog's media (legs ``ours`` and ``theirs``, one each side) through a
    UDP impairment relay: ours sends to the relay, theirs latches onto the relay's
    address as onto a peer behind NAT. Again after every redial (new legs)."""
    relay.target = theirs.bank.sock.getsockname()[:2]
    up, down = relay.up.forwarded, relay.down.forwarded
    _point(ours, ("127.0.0.1", relay.port), latch=False)
    # Ours' packets sent straight across before the move must be drained first, or theirs
    # would settle on our own address again instead of the relay's.
    await asyncio.sleep(0.2)
    _point(theirs, theirs.bank.table.media[theirs.row].remote, latch=True)
    # (An idle Opus link leg rests: 2.5 packets a second, bank_opus. A few each way say
    # the media flows.)
    await waiting.until(
        lambda: relay.up.forwarded > up + 5 and relay.down.forwarded > down + 5,
        15,
        "media through the relay both ways",
    )


async def both_up(ca, us, name: str = "shiprider", timeout: float = 20) -> None:  # noqa: ANN001
    """Wait until the shared ``name`` is up on both sides (CA's link "us", US's "ca")."""
    await waiting.until(
        lambda: share_state(ca, "us", name) == "up" and share_state(us, "ca", name) == "up",
        timeout,
        f"{name} up on both sides",
    )
