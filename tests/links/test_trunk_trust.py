"""Only this link's peer reaches the trunk: a certificate from the peer's CA carrying the
peer's name, or a pinned one. Same CA with another name, the right name from another
CA, or no certificate at all: not the peer (the INVITE goes to ordinary routes)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from trunk_sites import make_pki

from gateway.demo.pki import Authority
from gateway.links.config import LinkConfig
from gateway.links.trunk import Trunk
from gateway.sip.transport import Source


def trunk(config: LinkConfig) -> Trunk:
    loop = asyncio.new_event_loop()  # Trunk makes an Event; no loop needs to run
    asyncio.set_event_loop(loop)
    try:
        return Trunk(
            "us",
            config,
            "ca",
            None,
            None,
            lambda *a, **k: None,  # type: ignore[arg-type]
            lambda: (False, frozenset()),
        )
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def tls(der: bytes, identity: str) -> Source:
    return Source(("127.0.0.1", 40000), "tls", identity, der)


def test_the_peer_is_recognised_by_its_ca_and_name_or_by_its_pin(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, ("ca", "us"))
    mine = pki.certs["ca"]
    config = LinkConfig.model_validate(
        {
            "peer": "127.0.0.1:5061",
            "peer_name": "us.link.test",
            "certificate": str(mine.certificate),
            "key": str(mine.key),
            "peer_ca": str(pki.cas["us"].bundle),
            "share": {"marine": "shiprider"},
        }
    )
    link = trunk(config)
    peer = pki.certs["us"]
    assert link.recognises(tls(peer.der, "us.link.test"))
    impostor = pki.cas["us"].issue("other.link.test")  # the peer's CA, another name
    assert not link.recognises(tls(impostor.der, "other.link.test"))
    elsewhere = Authority(tmp_path / "rogue", "Rogue CA").issue("us.link.test")
    assert not link.recognises(tls(elsewhere.der, "us.link.test")), "another CA, same name"
    assert not link.recognises(Source(("127.0.0.1", 40000), "tcp", "us.link.test", peer.der))
    assert not link.recognises(tls(b"", ""))

    pinned = LinkConfig.model_validate(
        {
            "peer": "127.0.0.1:5061",
            "certificate": str(mine.certificate),
            "key": str(mine.key),
            "peer_fingerprints": [hashlib.sha256(elsewhere.der).hexdigest()],
        }
    )
    link = trunk(pinned)
    assert link.recognises(tls(elsewhere.der, "us.link.test"))
    assert not link.recognises(tls(peer.der, "us.link.test"))


def test_with_a_ca_and_pins_both_must_hold(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, ("ca", "us"))
    mine, peer = pki.certs["ca"], pki.certs["us"]
    renewed = pki.cas["us"].issue("us.link.test")  # same CA and name, not pinned
    config = LinkConfig.model_validate(
        {
            "peer": "127.0.0.1:5061",
            "peer_name": "us.link.test",
            "certificate": str(mine.certificate),
            "key": str(mine.key),
            "peer_ca": str(pki.cas["us"].bundle),
            "peer_fingerprints": [hashlib.sha256(peer.der).hexdigest()],
        }
    )
    link = trunk(config)
    assert link.recognises(tls(peer.der, "us.link.test"))
    assert not link.recognises(tls(renewed.der, "us.link.test"))
