"""The console over TLS with a real (self-signed) certificate: aiohttp and Chromium.

The certificate is made here with the ``cryptography`` package (already a
dependency of aiortc), for 127.0.0.1 only. Clients trust exactly that
certificate: aiohttp through an SSL context with it as the only CA, Chromium
through ``--ignore-certificate-errors-spki-list`` with its public-key hash (the
way a site pins a private CA's certificate without installing it system-wide).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import ssl
from pathlib import Path

import aiohttp
import pytest
from console_site import PASSWORDS, RADIO_TONE_HZ, console_site, run
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.waiting import until


def make_certificate(directory: Path) -> tuple[Path, Path, str]:
    """A self-signed certificate for 127.0.0.1: (cert path, key path, SPKI SHA-256 base64)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "borderlink test gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "gateway.crt", directory / "gateway.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return cert_path, key_path, base64.b64encode(hashlib.sha256(spki).digest()).decode()


def web_tls(cert: Path, key: Path) -> str:
    return f'tls_certificate = "{cert}"\ntls_key = "{key}"'


def test_login_over_https_sets_a_secure_cookie(tmp_path):
    cert, key, _ = make_certificate(tmp_path)

    async def scenario():
        async with console_site(tmp_path, browser=False, web=web_tls(cert, key)) as site:
            assert site.url.startswith("https://127.0.0.1:")
            base = site.url.removesuffix("/console/")
            trust = ssl.create_default_context(cafile=str(cert))
            # A client that does not trust the certificate is refused by TLS itself.
            async with aiohttp.ClientSession() as stranger:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await stranger.get(f"{base}/console/")
            connector = aiohttp.TCPConnector(ssl=trust)
            jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
            async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as http:
                r = await http.post(
                    f"{base}/api/console/login",
                    json={"operator": "alice", "password": PASSWORDS["alice"]},
                )
                assert r.status == 200
                cookie = r.headers["Set-Cookie"]
                attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
                assert {"secure", "httponly"} <= attributes, cookie
                assert "SameSite=Strict" in cookie
                me = await http.get(f"{base}/api/console/me")  # the cookie is sent back
                assert me.status == 200 and (await me.json())["operator"] == "alice"
                ws = await http.ws_connect(f"{base}/api/console/events")  # wss://
                await ws.send_json({"type": "hello", "console": "tlsconsole000001"})
                msg = await ws.receive_json(timeout=5)
                assert msg["type"] in ("hello", "state")
                await ws.close()

    run(scenario())


def test_chromium_uses_the_console_over_https(tmp_path):
    cert, key, spki = make_certificate(tmp_path)

    async def scenario():
        async with console_site(
            tmp_path,
            web=web_tls(cert, key),
            browser_args=(f"--ignore-certificate-errors-spki-list={spki}",),
        ) as site:
            page = await site.console("alice")
            await site.wait_joined(page, "marine")
            assert await page.evaluate("window.isSecureContext && location.protocol") == "https:"
            cookies = await page.context.cookies()
            session = [c for c in cookies if c["name"] == "borderlink_session"]
            assert session and session[0]["secure"] and session[0]["httpOnly"], cookies
            assert await page.evaluate("document.cookie") == ""  # scripts cannot read it
            await page.locator("#link").filter(has_text="connected").wait_for(timeout=5000)
            site.radio().open_squelch(True)  # who-is-talking over wss:, audio over DTLS-SRTP
            await page.wait_for_function(
                "() => window.borderlink.talkerSeen['marine|uscg_vhf']", timeout=5000
            )

            async def hears_radio():
                m = await page.evaluate("borderlink.measure('marine')")
                return m and abs(m["peakHz"] - RADIO_TONE_HZ) < 12 and m["rmsDbfs"] > -30

            await until(hears_radio, 8, "the page to hear the radio's 700 Hz over https")

    run(scenario())
