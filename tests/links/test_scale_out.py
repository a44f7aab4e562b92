"""More than one gateway: a site spread over two gateways behind kamailio's dispatcher, and
three sites in a chain.

Scale-out is the link mechanism: each gateway owns its radios, the gateways share the
site's talkgroups over a link, and kamailio (``dispatcher``, round robin) spreads the
phones' calls over them — a phone on one gateway hears a radio on the other. In a chain
A–B–C where B is not a relay (``[links] relay``; tests/links/test_chain_relay.py) a link
carries only its own side's audio, so B hears both ends, A and C hear B but not each
other, and nobody hears anything twice or their own voice come back. Audio is judged by
content (tones).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from trunk_sites import (
    LinkSpec,
    SiteSpec,
    free_port,
    link_legs,
    make_pki,
    radio,
    running,
    site_toml,
)

from tests.sip.sip_peers import PASSWORD, Kamailio, Phone, band_db, run, tone
from tests.waiting import until

HERE = Path(__file__).parent
HEARD = -40.0
SILENT = -70.0
# A copy relayed or looped round would arrive at about the level of a direct one (-20 to
# -26 dB); on a busy machine concealed late packets splash clicks into every band at
# -60..-70 dB. "Not there" is between, far from both.
NOT_THERE = -45.0
PHONE_RATE = 8000
PROXY = "127.0.0.2"  # the gateways tell the proxy from the phones by address


def sip_legs(gateway) -> list:  # noqa: ANN001
    return [p for p in gateway.engine.ports if p.kind == "sip"]


@dataclass
class DispatchedSite:
    """Two gateways of one site, linked, behind kamailio's dispatcher; two phones."""

    paths: list[Path]
    proxy: Kamailio
    phones: dict[str, Phone]
    talk: dict[str, float]

    @property
    def dial(self) -> str:
        return f"sip:ops@{PROXY}:{self.proxy.port}"

    async def start_proxy(self) -> None:
        """Start kamailio once the gateways answer: a probe it sends before they do
        takes a gateway out of the set until the next one (2 s)."""
        await asyncio.get_running_loop().run_in_executor(None, self.proxy.start)

    def stop(self) -> None:
        for phone in self.phones.values():
            phone.stop()
        self.proxy.stop()

    async def call_arrives(self, gateways: list, count: int, name: str) -> None:
        """Wait for ``name``'s call to make ``count`` SIP legs; if it never does, fail with
        what kamailio and the phone said (a 503 from the dispatcher, a 408, a phone that
        never started)."""
        try:
            await until(
                lambda: sum(len(sip_legs(gw)) for gw in gateways) == count,
                30,
                f"{name}'s call through the dispatcher",
            )
        except AssertionError as error:
            said = re.sub(r"\[[\d:]+\] audio=\S+ \(bit/s\)\s*", "", self.phones[name].output())
            phone = "\n".join(line for line in said.splitlines() if line.strip())[-1500:]
            raise AssertionError(
                f"{error}\n--- kamailio ---\n{self.proxy.log_tail()}\n--- {name} ---\n{phone}"
            ) from None


def dispatched_site(tmp_path: Path) -> DispatchedSite:
    pki = make_pki(tmp_path, ("gw1", "gw2"))
    gw1 = SiteSpec(
        "gw1", {"ops": 1000.0}, [LinkSpec("gw2", "gw2", {"ops": "ops"})], sip_port=free_port()
    )
    gw2 = SiteSpec(
        "gw2", {"ops": 1500.0}, [LinkSpec("gw1", "gw1", {"ops": "ops"})], sip_port=free_port()
    )
    ports = {"gw1": gw1.tls_port, "gw2": gw2.tls_port}
    route = f'\n[sip.routes.ops]\ntalkgroup = "ops"\ntrusted = ["{PROXY}"]\n'
    paths = [site_toml(tmp_path, spec, ports, pki, extra=route) for spec in (gw1, gw2)]
    gateways = tmp_path / "dispatcher.list"
    gateways.write_text(f"1 sip:127.0.0.1:{gw1.sip_port}\n1 sip:127.0.0.1:{gw2.sip_port}\n")
    proxy = Kamailio(
        tmp_path,
        host=PROXY,
        template=HERE / "kamailio-dispatcher.cfg.in",
        values={"HOST": PROXY, "LIST": str(gateways)},
    )
    talk = {"alice": 600.0, "bob": 800.0}
    phones = {
        name: Phone(
            tmp_path,
            name,
            np.concatenate([np.zeros(PHONE_RATE), tone(hz, 13)]),
            registrar_port=proxy.port,
            registrar_host=PROXY,
            password=PASSWORD,
        )
        for name, hz in talk.items()
    }
    return DispatchedSite(paths, proxy, phones, talk)


def test_two_gateways_of_one_site_behind_kamailio_dispatcher(tmp_path: Path) -> None:
    site = dispatched_site(tmp_path)
    paths, phones, talk, dial = site.paths, site.phones, site.talk, site.dial

    async def main() -> None:
        async with running(paths[0]) as one, running(paths[1]) as two:
            await until(
                lambda: len(link_legs(one)) == 1 and len(link_legs(two)) == 1,
                20,
                "the two gateways linked",
            )
            await site.start_proxy()
            radio(one, "ops").speaking = True
            radio(two, "ops").speaking = True
            phones["alice"].start(dial=dial, seconds=12)
            await site.call_arrives([one, two], 1, "alice")
            phones["bob"].start(dial=dial, seconds=12)
            await site.call_arrives([one, two], 2, "bob")
            assert len(sip_legs(one)) == 1 and len(sip_legs(two)) == 1, "calls not spread"
            for gw in (one, two):
                dialog = next(d for d in gw.sip.calls.dialogs.values() if not d.peer.secure)
                assert dialog.peer.address[0] == PROXY, "a call that did not come via kamailio"

            def everyone_at(gw) -> bool:  # noqa: ANN001
                heard = radio(gw, "ops")
                return all(heard.level(hz, 0.5) > HEARD for hz in talk.values())

            # Each radio hears both phones: one on its own gateway, one across the link.
            await until(
                lambda: everyone_at(one) and everyone_at(two),
                15,
                "both phones heard at both gateways' radios",
            )
            assert radio(one, "ops").level(1500.0, 0.5) > HEARD, "gw2's radio not heard at gw1"
            assert radio(two, "ops").level(1000.0, 0.5) > HEARD, "gw1's radio not heard at gw2"
            assert len(link_legs(one)) == 1 and len(link_legs(two)) == 1
            await until(
                lambda: not any(p.running() for p in phones.values()), 25, "the phones to hang up"
            )

    try:
        run(main())
    finally:
        site.stop()
    # Each phone heard both radios (its own gateway's and the other's) and the other phone.
    for name, phone in phones.items():
        heard = phone.heard()[PHONE_RATE * 2 : -PHONE_RATE]
        other = talk["bob" if name == "alice" else "alice"]
        for hz in (1000.0, 1500.0, other):
            assert band_db(heard, PHONE_RATE, hz) > -40, f"{name} does not hear {hz:g} Hz"


def test_a_gateway_down_behind_the_dispatcher_leaves_every_call_to_the_other(
    tmp_path: Path,
) -> None:
    """gw2 is in the dispatcher's list but not running: kamailio tries the next gateway
    (no answer in 2 s) or has already taken gw2 out (OPTIONS probes); every call lands on
    gw1 and hears its radio."""
    site = dispatched_site(tmp_path)

    async def main() -> None:
        async with running(site.paths[0]) as one:
            await site.start_proxy()
            radio(one, "ops").speaking = True
            for count, name in enumerate(site.phones, 1):
                site.phones[name].start(dial=site.dial, seconds=10)
                await site.call_arrives([one], count, name)
            await until(
                lambda: (
                    radio(one, "ops").level(600.0, 0.5) > HEARD
                    and radio(one, "ops").level(800.0, 0.5) > HEARD
                ),
                15,
                "both phones heard at gw1",
            )
            await until(
                lambda: not any(p.running() for p in site.phones.values()),
                25,
                "the phones to hang up",
            )

    try:
        run(main())
    finally:
        site.stop()
    for name, phone in site.phones.items():
        heard = phone.heard()[PHONE_RATE * 2 : -PHONE_RATE]
        assert band_db(heard, PHONE_RATE, 1000.0) > -40, f"{name} does not hear gw1's radio"


def test_three_sites_in_a_chain_no_relay_no_loop_no_doubled_audio(tmp_path: Path) -> None:
    """A–B–C: B hears A and C; A and C hear B only (B forwards nothing from one link to
    the other); nobody hears its own tone come back."""
    pki = make_pki(tmp_path, ("a", "b", "c"))
    specs = {
        "a": SiteSpec("a", {"net": 1000.0}, [LinkSpec("b", "b", {"net": "chain"})]),
        "b": SiteSpec(
            "b",
            {"net": 1500.0},
            [LinkSpec("a", "a", {"net": "chain"}), LinkSpec("c", "c", {"net": "chain"})],
        ),
        "c": SiteSpec("c", {"net": 600.0}, [LinkSpec("b", "b", {"net": "chain"})]),
    }
    # Tones apart from each other's G.711 products: µ-law's error on a tone is periodic,
    # landing on multiples of 8000 / (samples per period) Hz — of 100 Hz for 700 Hz, which
    # put a -53 dB trace of C's tone in B's own 1500 Hz band, too close to NOT_THERE.
    ports = {name: spec.tls_port for name, spec in specs.items()}
    paths = {name: site_toml(tmp_path, spec, ports, pki) for name, spec in specs.items()}
    tones = {name: next(iter(spec.tones.values())) for name, spec in specs.items()}

    async def main() -> None:
        async with running(paths["a"]) as a, running(paths["b"]) as b, running(paths["c"]) as c:
            sites = {"a": a, "b": b, "c": c}
            await until(
                lambda: [len(link_legs(gw)) for gw in sites.values()] == [1, 2, 1],
                20,
                "both links of the chain up",
            )
            for gw in sites.values():
                radio(gw, "net").speaking = True
            await until(
                lambda: (
                    radio(b, "net").level(tones["a"], 0.5) > HEARD
                    and radio(b, "net").level(tones["c"], 0.5) > HEARD
                    and radio(a, "net").level(tones["b"], 0.5) > HEARD
                    and radio(c, "net").level(tones["b"], 0.5) > HEARD
                ),
                15,
                "each site to hear its neighbours",
            )
            # Each site's level of each tone: the loudest of five 0.2 s windows. A loaded
            # machine's gap (a skipped tick, a late packet concealed) only lowers a window;
            # a leak, a loop or a second copy would show in every one.
            heard = {name: dict.fromkeys(tones, -200.0) for name in sites}
            for _ in range(5):
                await asyncio.sleep(0.25)  # the next window of audio
                for name, gw in sites.items():
                    for of, hz in tones.items():
                        level = radio(gw, "net").level(hz, 0.2)
                        heard[name][of] = max(heard[name][of], level)
            # No relay: the ends do not hear each other through B.
            assert heard["a"]["c"] < NOT_THERE, f"C reached A through B: {heard}"
            assert heard["c"]["a"] < NOT_THERE, f"A reached C through B: {heard}"
            # No loop: nobody's own tone comes back round.
            for name in sites:
                assert heard[name][name] < NOT_THERE, f"{name} hears itself: {heard}"

            # No doubling: B's tone arrives at A and C at the same level (one copy each),
            # and B hears each end at the level the other end's link gives it. A doubled
            # copy stays 6 dB up; a busy machine's concealed frames only dip a second's
            # level now and then: polled, not sampled once.
            def level(at: str, of: str) -> float:
                return radio(sites[at], "net").level(tones[of], 1.0)

            await until(
                lambda: (
                    abs(level("a", "b") - level("c", "b")) < 2.0
                    and abs(level("b", "a") - level("b", "c")) < 2.0
                ),
                15,
                f"one copy of each tone at every site (first second: {heard})",
            )

    run(main())
