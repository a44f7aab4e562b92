"""A renewed TLS certificate is taken by a reload, without a restart and without a dropped call.

Agencies renew certificates every few months; a gateway that needs a restart for
that drops every call and every cross-border link at each renewal. The reload
reads the files again: new connections get the new certificate, open ones keep
theirs, and files that do not load are refused while the old ones stay in force.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from sip_peers import run
from test_sip_reload import running_site
from test_streams import client_context, options, read_message, tls_site

from gateway.demo.pki import Authority


def test_reload_takes_a_renewed_certificate_and_refuses_a_broken_one(tmp_path):
    ca = Authority(tmp_path / "ca")
    toml = tls_site(ca, tmp_path)  # the CA issues gateway.test: ca/gateway.test.{crt,key}
    site_cert = next(line for line in toml.splitlines() if line.startswith("tls_certificate"))
    cert_path = site_cert.split('"')[1]
    first = ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text())
    path = tmp_path / "site.toml"

    async def served_certificate(port: int) -> tuple[bytes, asyncio.StreamReader, object]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(ca), server_hostname="gateway.test"
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return der, reader, writer

    async def scenario() -> None:
        async with running_site(path, toml) as gw:
            port = gw.sip.transport.port_for("tls")
            der, old_reader, old_writer = await served_certificate(port)
            assert der == first
            old_writer.write(options(1))
            assert (await read_message(old_reader)).startswith(b"SIP/2.0 200")

            renewed = ca.issue("gateway.test", days=90)  # renewed in place: same files
            assert str(renewed.certificate) == cert_path
            result = await gw.reload_live()
            assert result.ok, result.error
            der, reader, writer = await served_certificate(port)
            assert der == renewed.der, "a new connection still gets the old certificate"
            writer.close()
            old_writer.write(options(2))  # the connection opened before the reload goes on
            assert (await read_message(old_reader)).startswith(b"SIP/2.0 200")
            expiry = gw.sip.stats()["sip_tls_certificate_expiry_days"]
            assert 89 < expiry <= 90, "the expiry metric still reads the old certificate"

            with open(cert_path, "w") as broken:
                broken.write("not a certificate\n")
            result = await gw.reload_live()
            assert not result.ok and "tls_certificate" in result.error, result.error
            der, reader, writer = await served_certificate(port)
            assert der == renewed.der, "a refused reload changed the certificate in force"
            writer.close()
            old_writer.close()

    run(scenario())


def test_a_client_of_another_ca_is_still_refused_after_a_reload(tmp_path):
    """The trust (tls_ca) is read again too: a reload never loosens it by accident."""
    ca = Authority(tmp_path / "ca")
    stranger = Authority(tmp_path / "stranger", name="Stranger CA").issue("phone.test")
    path = tmp_path / "site.toml"

    async def scenario() -> None:
        async with running_site(path, tls_site(ca, tmp_path)) as gw:
            port = gw.sip.transport.port_for("tls")
            result = await gw.reload_live()
            assert result.ok, result.error
            context = client_context(ca, stranger)
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="gateway.test"
                )
                writer.write(options(1))
                answer = await read_message(reader, timeout=3)
            except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                answer = b""
            assert not answer.startswith(b"SIP/2.0 200"), "a stranger's certificate was taken"

    run(scenario())
