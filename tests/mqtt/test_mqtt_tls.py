"""MQTT over TLS with a password, against mosquitto with a test CA; a wrong password is named."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiomqtt
from mqtt_support import Broker, Subscriber, live_site, require_binary

from tests.waiting import until

SITE = """
[site]
name = "TLS test"
country = "US"

[ports.a]
kind = "tone"

[talkgroups.tg]
members = ["a"]

[mqtt]
port = {port}
site_id = "tls"
tls = true
ca_file = "{ca}"
username = "gateway"
password_file = "{password_file}"
reconnect_min = "200ms"
reconnect_max = "1s"
"""


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for IP 127.0.0.1."""
    openssl = require_binary("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=borderlink-test-ca",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.cnf",
    )
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


def tls_broker(tmp_path: Path) -> Broker:
    ca, cert, key = make_pki(tmp_path)
    passwd = tmp_path / "mosquitto.passwd"
    tool = require_binary("mosquitto_passwd")
    subprocess.run(
        [tool, "-b", "-c", str(passwd), "gateway", "s3cret"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    broker = Broker(tmp_path)
    broker.conf.write_text(
        f"listener {broker.port} 127.0.0.1\nuser root\npersistence false\nlog_dest stderr\n"
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        f"allow_anonymous false\npassword_file {passwd}\n"
    )
    return broker


def test_tls_and_password_connect_and_a_wrong_password_is_reported(tmp_path: Path) -> None:
    broker = tls_broker(tmp_path)
    broker.start()
    good, bad = tmp_path / "good.pw", tmp_path / "bad.pw"
    good.write_text("s3cret\n")
    bad.write_text("guess\n")
    ca = tmp_path / "ca.pem"
    tls = aiomqtt.TLSParameters(ca_certs=str(ca))

    async def scenario() -> None:
        site = SITE.format(port=broker.port, ca=ca, password_file=good)
        subscriber = Subscriber(
            broker.port, "borderlink/tls/#", tls_params=tls, username="gateway", password="s3cret"
        )
        async with subscriber as sub, live_site(tmp_path, site) as gw:
            await until(lambda: gw.mqtt.connected, 10, "a TLS connection with the password")
            await until(lambda: sub.on("/state/ports/a"), 10, "retained state over TLS")
            assert sub.on("/state/ports/a")[-1]["talking"] is True
        site = SITE.format(port=broker.port, ca=ca, password_file=bad)
        async with live_site(tmp_path, site) as gw:
            await until(lambda: gw.mqtt.attempts >= 2, 10, "two refused attempts")
            assert gw.mqtt.connections == 0 and not gw.mqtt.connected
            assert "not authori" in gw.mqtt.last_error.lower(), gw.mqtt.last_error
            assert gw.clock.ticks > 0  # audio runs regardless

    try:
        asyncio.run(scenario())
    finally:
        broker.kill()
