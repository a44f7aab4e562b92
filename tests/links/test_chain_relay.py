"""A chain A–B–C whose middle relays: everyone hears everyone exactly once, one floor.

Three gateways, each in a process of its own (``site_process.py``), linked A–B and B–C
(and in one test A–C too) over TLS with SRTP under one shared name. B says
``[links] relay = ["net"]``. Each site has a radio that talks its tone (A 1000 Hz,
B 1500 Hz, C 2200 Hz) over a seeded noise signature of its own, and an ear that listens.

*Exactly once* is checked by content: what each radio and ear heard is cross-correlated
with what each talking radio sent (the tones notched out, so only the signature counts).
One path is one correlation peak at that path's delay, at the talker's level (0 dB);
a doubled talker would be a second peak as high at another delay, an echo a peak of a
radio's own signature in what it hears. The links speak G.711 here, which keeps the
waveform (Opus keeps only how it sounds). Audio through a jitter buffer on a loaded
machine may skip a frame now and then, which splits a peak for that window: the checks
poll until a window shows the expected picture, with generous time-outs.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from test_mesh_floor import AGENCY, TONES, UNIT, Mesh, SiteProcess
from trunk_sites import RATE, LinkSpec, SiteSpec, band_db, make_pki, site_toml

from tests.sip.sip_peers import run
from tests.waiting import until

SIGNATURE = {"a": 1, "b": 2, "c": 3}
WINDOW = 0.6  # seconds of a listener's audio per look
ONCE_DB = 3.0  # a copy heard at the talker's level: within ±3 dB of 0 dB (G.711, resampling)
SECOND_DB = -10.0  # any second copy (a doubled talker, an echo) is above this
ABSENT_DB = -14.0  # a talker not heard at all: its best peak is below this (the floor ~-22)
TONE_DB = -20.0  # each radio's tone level
TONE_ABSENT_DB = -40.0  # a tone not heard


def chain(
    tmp: Path,
    links: dict[str, list[str]],
    relay: tuple[str, ...] = ("net",),
    floor: str = "mix",
    signature: bool = True,
) -> dict[str, Path]:
    """Site files: ``links`` says which sites each links to; B relays ``relay``."""
    pki = make_pki(tmp, tuple(TONES))
    specs = {
        site: SiteSpec(
            site,
            {"net": hz},
            [LinkSpec(peer, peer, {"net": "net"}) for peer in links[site]],
            floor=floor,
            agency=AGENCY[site],
            labels={"net": UNIT[site]},
            listeners=("net",),
            relay=relay if site == "b" else (),
            codecs=("pcmu",) if signature else (),
            signature=SIGNATURE[site] if signature else 0,
        )
        for site, hz in TONES.items()
    }
    ports = {site: spec.tls_port for site, spec in specs.items()}
    return {site: site_toml(tmp, spec, ports, pki) for site, spec in specs.items()}


CHAIN = {"a": ["b"], "b": ["a", "c"], "c": ["b"]}
TRIANGLE = {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}


class Sites(Mesh):
    """The three processes; ``links`` is the topology they were built with."""

    def __init__(self, sites: dict[str, SiteProcess], links: dict[str, list[str]]) -> None:
        super().__init__(sites)
        self.links = links

    async def all_up(self) -> bool:
        for name, site in self.sites.items():
            shares = (await site.ask(op="state"))["shares"]
            if sorted(shares) != sorted(self.links[name]):
                return False
            if any(s.get("net") != "up" for s in shares.values()):
                return False
        return True

    async def relaying(self) -> str | None:
        """B's relay of "net": "" relaying, else why it is held back (None: not a relay)."""
        return (await self.sites["b"].ask(op="state"))["relaying"].get("net")

    async def audio(self, site: str, port: str, seconds: float, sent: bool = False) -> np.ndarray:
        answer = await self.sites[site].ask(op="audio", port=port, seconds=seconds, sent=sent)
        return np.frombuffer(base64.b64decode(answer["audio"]), "<f4")

    async def picture(self) -> dict[tuple[str, str, str], tuple[float, float, float]]:
        """For every listener (site, port) and talker site: (best, second) copy of its
        signature in dB of its level, and its tone's level in dBFS."""
        heard = {
            (site, port): await self.audio(site, port, WINDOW)
            for site in self.sites
            for port in ("net-radio", "net-ear")
        }
        sent = {site: await self.audio(site, "net-radio", 3.0, sent=True) for site in self.sites}
        return {
            (site, port, talker): (
                *copies(audio, sent[talker]),
                band_db(audio, RATE, TONES[talker], width=10.0),
            )
            for (site, port), audio in heard.items()
            for talker in self.sites
        }


def copy_gains(heard: np.ndarray, sent: np.ndarray) -> np.ndarray | None:
    """The level of ``sent`` in ``heard`` at every lag of ``heard`` inside ``sent`` (1: a
    copy at the talker's level), None when there is nothing to compare.

    Cross-correlation by FFT of the signature band only (300-3400 Hz, each site's tone
    ±40 Hz notched out), divided by the energy of ``sent`` over one window."""
    if len(heard) == 0 or len(sent) <= len(heard):
        return None
    n = len(sent) + len(heard)
    hz = np.fft.rfftfreq(n, 1 / RATE)
    band = (hz >= 300) & (hz <= 3400)
    for tone in TONES.values():
        band &= np.abs(hz - tone) > 40
    spectrum = np.fft.rfft(sent, n) * band
    r = np.fft.irfft(np.conj(np.fft.rfft(heard, n)) * spectrum, n)[: len(sent) - len(heard) + 1]
    energy = np.mean(np.fft.irfft(spectrum, n)[: len(sent)] ** 2) * len(heard)
    return np.abs(r) / energy if energy > 0 else None


def copies(heard: np.ndarray, sent: np.ndarray) -> tuple[float, float]:
    """The strongest and the second copy of ``sent`` in ``heard``, in dB of its level
    (:func:`copy_gains`). The second copy is the best peak more than 5 ms from the first."""
    gain = copy_gains(heard, sent)
    if gain is None:
        return -99.0, -99.0
    first = int(np.argmax(gain))
    rest = gain.copy()
    guard = int(0.005 * RATE)
    rest[max(0, first - guard) : first + guard] = 0
    db = lambda g: float(20 * np.log10(max(g, 1e-5)))  # noqa: E731
    return db(gain[first]), db(rest.max())


async def exactly(sites: Sites, expect: dict[tuple[str, str], set[str]], what: str) -> None:
    """Poll until each listener (site, port) hears each talker in ``expect`` exactly once
    at its level (and its tone at its level), and every other talker not at all (its tone
    neither)."""
    last: dict = {}

    async def holds() -> bool:
        picture = await sites.picture()
        wrong = {}
        for (site, port, talker), (best, second, tone) in picture.items():
            if talker in expect[(site, port)]:
                bad = abs(best) > ONCE_DB or second > SECOND_DB or abs(tone - TONE_DB) > ONCE_DB
            else:
                bad = best > ABSENT_DB or tone > TONE_ABSENT_DB
            if bad:
                wrong[(site, port, talker)] = (round(best, 1), round(second, 1), round(tone, 1))
        last.clear()
        last.update(wrong)
        return not wrong

    try:
        await until(holds, 60, what)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; last (listener, talker): (best, second copy dB, tone dBFS): {last}"
        ) from None


def everyone_but_own(links: dict[str, list[str]], reach: dict[str, set[str]]) -> dict:
    """Who each listener should hear: its ear every site in ``reach`` and its own; its
    radio the same but never itself."""
    expect = {}
    for site in links:
        expect[(site, "net-ear")] = reach[site] | {site}
        expect[(site, "net-radio")] = reach[site] - {site}
    return expect


async def started(paths: dict[str, Path], tmp: Path, links: dict[str, list[str]]) -> Sites:
    processes = {n: SiteProcess(n, p, tmp / f"{n}.log") for n, p in paths.items()}
    sites = Sites(processes, links)
    for site in processes.values():
        await site.start()
    await until(sites.all_up, 60, "every link up")
    return sites


def test_a_relay_in_the_middle_of_a_chain_lets_both_ends_hear_each_other_once(
    tmp_path: Path,
) -> None:
    """A–B–C, B relays: A hears C and C hears A, each once at its level; no echo, no
    doubling; B hears both. Cutting B–C stops A at C (and C at A)."""
    paths = chain(tmp_path, CHAIN)

    async def main() -> None:
        sites = await started(paths, tmp_path, CHAIN)
        try:
            await until(lambda: _is(sites.relaying(), ""), 30, "B relaying net")
            await sites.key("abc")
            everyone = {s: {"a", "b", "c"} for s in "abc"}
            await exactly(sites, everyone_but_own(CHAIN, everyone), "everyone heard once")

            await sites.sites["b"].ask(op="cut", link="c")
            cut = {"a": {"a", "b"}, "b": {"a", "b"}, "c": {"c"}}
            await exactly(sites, everyone_but_own(CHAIN, cut), "A and C apart after the cut")
        finally:
            for site in sites.sites.values():
                await site.stop()

    run(main())


def test_a_chain_without_relay_keeps_each_link_to_its_own_side(tmp_path: Path) -> None:
    """A–B–C, nobody relays: as before, B hears both, A and C hear B but not each other."""
    paths = chain(tmp_path, CHAIN, relay=())

    async def main() -> None:
        sites = await started(paths, tmp_path, CHAIN)
        try:
            assert await sites.relaying() is None
            await sites.key("abc")
            reach = {"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}
            await exactly(sites, everyone_but_own(CHAIN, reach), "A and C apart, B between")
        finally:
            for site in sites.sites.values():
                await site.stop()

    run(main())


def test_a_relay_in_a_triangle_holds_back_so_nobody_is_heard_twice(tmp_path: Path) -> None:
    """A–B–C–A with B set to relay: A and C say they link directly, so B holds back
    (logged, a metric); everyone hears everyone exactly once, straight across."""
    paths = chain(tmp_path, TRIANGLE)

    async def main() -> None:
        sites = await started(paths, tmp_path, TRIANGLE)
        try:
            await until(
                lambda: _contains(sites.relaying(), "directly"), 30, "B to hold its relay back"
            )
            await sites.key("abc")
            everyone = {s: {"a", "b", "c"} for s in "abc"}
            await exactly(sites, everyone_but_own(TRIANGLE, everyone), "everyone heard once")
            assert "directly" in (await sites.relaying() or "")
        finally:
            for site in sites.sites.values():
                await site.stop()

    run(main())


def port_of(winner: str) -> dict[str, str]:
    """Where each site of the chain hears the winner: its radio at home, B the link leg to
    the winner, an end the leg to B (the winner beyond it is relayed)."""
    return {
        site: "net-radio" if site == winner else f"link-{winner if site == 'b' else 'b'}-"
        for site in TONES
    }


def test_one_floor_holds_across_a_relayed_chain(tmp_path: Path) -> None:
    """A single floor across A–B–C with B relaying: A and C colliding end on one holder at
    all three (the ends rank each other's talker by its own site, key-up and talker ID,
    passed on by B), the holder's tone everywhere and the loser's nowhere; an emergency
    at C pre-empts A across two hops; each site names the holder by its label."""
    paths = chain(tmp_path, CHAIN, floor="single", signature=False)

    async def main() -> None:
        sites = await started(paths, tmp_path, CHAIN)
        m = sites
        try:
            await until(lambda: _is(sites.relaying(), ""), 30, "B relaying net")
            for _ in range(2):
                await m.key("ac")
                winner, _ = await m.converged("ac")
                loser = "c" if winner == "a" else "a"
                await m.heard_only(winner, loser)
                await m.events_name("floor_granted", port_of(winner), winner, winner)
                await m.released("ac")

            await m.key("a")
            await m.converged("a")
            await m.key("c", emergency=True)
            held, holder = await m.converged("ac")
            assert held == "c" and holder[3], f"the emergency does not hold: {holder}"
            await m.events_name("preempted", port_of("a"), "a", "c", by="c")
            await m.events_name("floor_granted", port_of("c"), "c", "c")
            await m.key("c", on=False)
            held, _ = await m.converged("a")
            assert held == "a"
            await m.events_name("floor_granted", port_of("a"), "a", "a")
            await m.released("a")
        finally:
            for site in sites.sites.values():
                await site.stop()

    run(main())


async def _is(value, expected) -> bool:  # noqa: ANN001
    return (await value) == expected


async def _contains(value, part: str) -> bool:  # noqa: ANN001
    return part in ((await value) or "")


def test_copies_finds_one_copy_two_copies_and_none() -> None:
    """The analysis itself: a delayed copy is one 0 dB peak; two copies two; none none."""
    from trunk_sites import signature_noise

    noise = signature_noise(1, -26.0)[: 3 * RATE]
    other = signature_noise(2, -26.0)[: 3 * RATE]
    heard = noise[RATE : RATE + int(WINDOW * RATE)]
    best, second = copies(heard, noise)
    assert abs(best) < 0.5 and second < SECOND_DB
    doubled = heard + noise[RATE + 800 : RATE + 800 + len(heard)]
    best, second = copies(doubled, noise)
    assert second > -3
    assert copies(other[: len(heard)], noise)[0] < ABSENT_DB
