"""SIP over TLS and TCP with real peers: kamailio (tls module) and baresip phones.

Each test makes its own CA and certificates (:mod:`pki`). The gateway registers
with kamailio over TLS, a baresip phone calls a talkgroup through kamailio over
TLS, another calls the gateway straight over TCP; audio is checked by content
(the phone hears the radio's 1000 Hz, the talkgroup hears the phone's 600 Hz).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from sip_peers import PASSWORD, Kamailio, band_db, dominant_hz, run, running_gateway, tone
from test_calls import legs, recorded

from gateway.demo.pki import Authority
from tests.conftest import free_port
from tests.waiting import until

RATE = 8000


def site(tmp: Path, sip: str = "", accounts: str = "", who: str = "public = true") -> str:
    """A radio sending 1000 Hz and a recorder in talkgroup ``marine``, number 6001
    (``who``: who may call it)."""
    return f"""
[site]
name = "sip-tls-test"
country = "CA"

[ports.radio1]
kind = "simulated_radio"
tone_hz = 1000.0
talk_every = "0s"
talk_for = "0s"
level_dbfs = -12.0

[ports.rec]
kind = "recorder"
directory = "{tmp / "talkgroup"}"
continuous = true

[talkgroups.marine]
members = ["radio1", "rec"]

[sip]
listen = "127.0.0.1:{free_port()}"
rtp_ports = "20000-31999"
{sip}
{accounts}
[sip.routes."6001"]
talkgroup = "marine"
{who}
"""


def tls_keys(cert: Path, key: Path, ca: Path | None = None) -> str:
    lines = [
        f'listen_tls = "127.0.0.1:{free_port()}"',
        f'tls_certificate = "{cert}"',
        f'tls_key = "{key}"',
    ]
    if ca is not None:
        lines.append(f'tls_ca = "{ca}"')
    return "\n".join(lines)


def check_audio(phone, tmp_path: Path) -> None:
    heard = phone.heard()
    assert len(heard) > 2 * RATE, "the call was too short to judge"
    middle = heard[RATE : len(heard) - RATE // 2]
    assert abs(dominant_hz(middle, RATE) - 1000) < 15, "phone does not hear the radio's 1000 Hz"
    assert band_db(middle, RATE, 1000) > -20, "the radio is too quiet at the phone"
    assert band_db(middle, RATE, 600) < band_db(middle, RATE, 1000) - 30, "phone hears itself"
    talkgroup = recorded(tmp_path / "talkgroup")
    assert band_db(talkgroup, 16000, 600) > -30, "the talkgroup does not hear the phone"


def both(issued) -> Path:
    """baresip wants its certificate and key in one PEM file."""
    path = issued.certificate.with_suffix(".pem")
    path.write_bytes(issued.certificate.read_bytes() + issued.key.read_bytes())
    return path


def test_registers_over_tls_and_a_tls_phone_calls_through_kamailio(phones, tmp_path):
    ca = Authority(tmp_path / "pki")
    registrar_cert = ca.issue("registrar.test")
    gateway_cert = ca.issue("gateway.test")
    phone_cert = ca.issue("phone.test")
    kamailio = Kamailio(tmp_path, tls=(registrar_cert.certificate, registrar_cert.key, ca.bundle))
    kamailio.start()
    source = np.concatenate([np.zeros(RATE), tone(600, 9)])
    phone = phones(
        "dispatch",
        source,
        registrar_port=kamailio.tls_port,
        transport="tls",
        cafile=ca.bundle,
        certificate=both(phone_cert),
    )
    sip = tls_keys(gateway_cert.certificate, gateway_cert.key, ca.bundle)
    account = f"""
[sip.accounts.marine]
registrar = "sips:127.0.0.1:{kamailio.tls_port}"
username = "6001"
password = "{PASSWORD}"
expires = "60s"
"""

    async def scenario() -> None:
        # Only calls relayed by the registrar, proved by its certificate, reach 6001.
        trusted = 'trusted = ["tls:registrar.test"]'
        async with running_gateway(site(tmp_path, sip, account, trusted)) as gw:
            registration = gw.sip.registrations["marine"]
            await asyncio.wait_for(registration.registered.wait(), 10)
            assert registration.peer.transport == "tls"
            streams = gw.sip.transport.streams
            registrar = streams.connections[("tls", ("127.0.0.1", kamailio.tls_port))]
            assert registrar.identity == "registrar.test", "kamailio's certificate was verified"
            # Both REGISTERs (challenge and answer) went over one connection, never resent.
            assert streams.stats.connected == 1
            assert gw.sip.transport.stats.retransmissions == 0
            phone.start(dial=f"sip:6001@127.0.0.1:{kamailio.tls_port};transport=tls", seconds=5)
            await until(lambda: legs(gw), 15, "the call through kamailio to be answered")
            dialog = next(iter(gw.sip.calls.dialogs.values()))
            assert dialog.peer.transport == "tls"
            assert dialog.peer.identity == "registrar.test", "the INVITE came from kamailio"
            await until(lambda: dialog.acked, 5, "the ACK")
            # The phone sends its ACK straight to our Contact, over TLS, with its certificate.
            identities = {c.identity for (kind, _), c in streams.connections.items()}
            assert "phone.test" in identities, identities
            await until(lambda: not phone.running(), 15, "the phone to hang up")
            await until(lambda: not legs(gw), 10, "BYE to end the leg")
            assert gw.sip.stats()["sip_tls_handshake_failures"] == 0
            assert 19 < gw.sip.stats()["sip_tls_certificate_expiry_days"] < 20

    try:
        run(scenario())
    finally:
        kamailio.stop()
    assert "TLS" in phone.output() or "tls" in phone.output()
    check_audio(phone, tmp_path)


def test_phone_over_tcp_straight_to_the_gateway(phones, tmp_path):
    """The phone calls over TCP; the gateway hangs up, its BYE going back on the phone's
    own connection (the one the INVITE came on)."""
    phone = phones("tcpphone", np.concatenate([np.zeros(RATE), tone(600, 14)]), transport="tcp")
    sip = f'listen_tcp = "127.0.0.1:{free_port()}"'

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, sip)) as gw:
            port = gw.sip.transport.port_for("tcp")
            phone.start(dial=f"sip:6001@127.0.0.1:{port};transport=tcp", seconds=14)
            await until(lambda: legs(gw), 10, "the call over TCP to be answered")
            dialog = next(iter(gw.sip.calls.dialogs.values()))
            assert dialog.peer.transport == "tcp" and dialog.peer.identity == ""
            assert ";transport=tcp>" in dialog.answer.decode()  # our Contact says TCP
            leg = legs(gw)[0]
            await until(lambda: leg.stats()["packets_in"] >= 200, 15, "4 s of the phone's audio")
            streams = gw.sip.transport.streams
            timeouts = gw.sip.transport.stats.timeouts
            await gw.sip.calls.hangup(dialog)
            assert gw.sip.transport.stats.timeouts == timeouts, "the BYE got no answer"
            assert streams.stats.connected == 0, "the BYE opened a connection of its own"
            # libre reports a BYE it received as "Connection reset by peer", then this:
            await until(lambda: "terminated" in phone.output(), 10, "the phone to see the BYE")

    run(scenario())
    check_audio(phone, tmp_path)


def test_registrar_that_does_not_verify_is_refused_and_a_pinned_one_accepted(tmp_path, caplog):
    """The gateway connects to kamailio over TLS: a certificate that chains to another CA,
    or is not the pinned one, ends the handshake (counted); the pinned one registers."""
    ca = Authority(tmp_path / "pki")
    other_ca = Authority(tmp_path / "other", name="Other CA")
    registrar_cert = ca.issue("registrar.test")
    gateway_cert = ca.issue("gateway.test")
    wrong_pin = ca.issue("someone-else.test").pin
    kamailio = Kamailio(tmp_path, tls=(registrar_cert.certificate, registrar_cert.key, ca.bundle))
    kamailio.start()
    account = f"""
[sip.accounts.marine]
registrar = "127.0.0.1:{kamailio.tls_port}"
transport = "tls"
username = "6001"
password = "{PASSWORD}"
"""
    plain = tls_keys(gateway_cert.certificate, gateway_cert.key)
    cases = {
        "another CA": (plain + f'\ntls_ca = "{other_ca.bundle}"', False),
        "pin mismatch": (plain + f'\ntls_pins = ["{wrong_pin}"]', False),
        "pinned": (
            plain + f'\ntls_pins = ["{registrar_cert.pin.upper().replace("SHA", "sha")}"]',
            True,
        ),
    }

    async def attempt(sip: str, trusted: bool) -> None:
        async with running_gateway(site(tmp_path, sip, account)) as gw:
            registration = gw.sip.registrations["marine"]
            streams = gw.sip.transport.streams
            if trusted:
                await asyncio.wait_for(registration.registered.wait(), 10)
                connection = streams.connections[("tls", ("127.0.0.1", kamailio.tls_port))]
                assert connection.identity == registrar_cert.pin
                assert streams.stats.handshake_failures == 0
                return
            await until(lambda: registration.failures >= 1, 15, "the registration to fail")
            assert not registration.registered.is_set()
            assert streams.stats.handshake_failures >= 1
            assert gw.sip.stats()["sip_tls_handshake_failures"] >= 1
            assert not streams.connections, "an unverified server stayed connected"

    try:
        for what, (sip, trusted) in cases.items():
            caplog.clear()
            run(attempt(sip, trusted))
            failed = [r.getMessage() for r in caplog.records if "handshake" in r.getMessage()]
            if trusted:
                assert not failed, failed
            else:
                assert failed, f"{what}: no log line"
                assert "127.0.0.1" in failed[0], failed
    finally:
        kamailio.stop()


def test_dial_out_over_tls_to_a_phone_that_proves_its_name(phones, tmp_path):
    """A ``sips:`` dial-out: the gateway connects over TLS, checks the phone's certificate
    against the CA and the address it called, and the call carries the talkgroup."""
    ca = Authority(tmp_path / "pki")
    gateway_cert = ca.issue("gateway.test")
    phone = phones(
        "duty",
        np.concatenate([np.zeros(RATE), tone(600, 9)]),
        transport="tls",
        cafile=ca.bundle,
        certificate=both(ca.issue("duty.test")),
    )
    tls_port = phone.port + 1  # baresip listens for TLS on sip_listen + 1
    sip = tls_keys(gateway_cert.certificate, gateway_cert.key, ca.bundle)
    dial_out = f"""
[sip.dial_out.duty]
talkgroup = "marine"
uri = "sips:duty@127.0.0.1:{tls_port}"
retry_min = "1s"
"""

    async def scenario() -> None:
        phone.start(seconds=15)
        async with running_gateway(site(tmp_path, sip) + dial_out) as gw:
            await until(lambda: legs(gw), 15, "the phone to answer the dial-out")
            dialog = next(iter(gw.sip.calls.dialogs.values()))
            assert dialog.peer.transport == "tls" and not dialog.incoming
            connection = gw.sip.transport.streams.connections[("tls", ("127.0.0.1", tls_port))]
            assert connection.identity == "duty.test"
            leg = legs(gw)[0]
            await until(lambda: leg.stats()["packets_in"] >= 200, 15, "4 s of the phone's audio")
            # The phone hangs up: its BYE comes to our Contact, over a TLS connection of
            # its own (it checks our certificate too).
            phone.key("b")
            await until(lambda: not legs(gw), 10, "the phone's BYE to end the leg")

    run(scenario())
    check_audio(phone, tmp_path)
