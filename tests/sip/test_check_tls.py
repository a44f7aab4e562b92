"""`borderlink check` (and a reload) refuse TLS files that would fail the first handshake.

Each bad input must name the file and the reason: missing, a directory, not PEM,
expired, not yet valid, a key of another certificate; and TLS used without what it
needs (a listener without a certificate, a TLS registrar without a TLS listener).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config import load_config
from gateway.demo.pki import Authority

SITE = """
[site]
name = "sip tls check"
country = "CA"

[ports.radio]
kind = "simulated_radio"

[talkgroups.marine]
members = ["radio"]

[sip]
listen = "127.0.0.1:5999"
{sip}

[sip.routes."6001"]
talkgroup = "marine"
public = true
{more}
"""


def check(tmp_path: Path, sip: str, more: str = "") -> subprocess.CompletedProcess:
    path = tmp_path / "site.toml"
    path.write_text(SITE.format(sip=sip, more=more))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def tls(cert: Path | str, key: Path | str, extra: str = "") -> str:
    return f'listen_tls = "127.0.0.1:5998"\ntls_certificate = "{cert}"\ntls_key = "{key}"\n{extra}'


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "pki")


def test_good_tls_files_pass(tmp_path, ca):
    site = ca.issue("gateway.test")
    result = check(tmp_path, tls(site.certificate, site.key, f'tls_ca = "{ca.bundle}"'))
    assert result.returncode == 0, result.stderr
    # check prints what a peer pins, as openssl prints it, and when the certificate expires.
    hexa = site.pin.removeprefix("sha256:").upper()
    assert ":".join(hexa[i : i + 2] for i in range(0, 64, 2)) in result.stdout, result.stdout
    assert "expires in 20 days" in result.stdout or "expires in 19 days" in result.stdout


def test_expired_certificate_missing_ca_and_bad_pin_named_together(tmp_path, ca):
    expired = ca.issue("old.test", days=-2, not_before_days=-30)
    missing = tmp_path / "nowhere" / "ca.pem"
    result = check(
        tmp_path,
        tls(expired.certificate, expired.key, f'tls_ca = "{missing}"\ntls_pins = ["sha256:12"]'),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "3 problems" in err, err
    assert "sip.tls_certificate" in err and str(expired.certificate) in err and "expired" in err
    assert "sip.tls_ca" in err and str(missing) in err and "does not exist" in err
    assert "sip.tls_pins" in err and "64 hex digits" in err


def test_key_of_another_certificate(tmp_path, ca):
    site, other = ca.issue("gateway.test"), ca.issue("other.test")
    result = check(tmp_path, tls(site.certificate, other.key))
    assert result.returncode == 2
    assert "sip.tls_key" in result.stderr
    assert str(other.key) in result.stderr and "does not match" in result.stderr
    assert str(site.certificate) in result.stderr


def test_certificate_not_yet_valid_and_files_that_are_not_pem(tmp_path, ca):
    future = ca.issue("future.test", not_before_days=3, days=30)
    result = check(tmp_path, tls(future.certificate, future.key))
    assert result.returncode == 2
    assert str(future.certificate) in result.stderr and "not valid before" in result.stderr

    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a certificate\n")
    result = check(tmp_path, tls(junk, future.key))
    assert result.returncode == 2
    assert str(junk) in result.stderr and "no PEM certificate" in result.stderr

    site = ca.issue("gateway.test")
    result = check(tmp_path, tls(site.certificate, tmp_path))  # a directory, not a key
    assert result.returncode == 2
    assert "sip.tls_key" in result.stderr and "is a directory" in result.stderr

    result = check(tmp_path, tls(site.certificate, site.certificate))  # PEM, but not a key
    assert result.returncode == 2, result.stderr
    assert "sip.tls_key" in result.stderr and "holds no PEM private key" in result.stderr


def test_tls_used_without_what_it_needs(tmp_path, ca):
    result = check(tmp_path, 'listen_tls = "127.0.0.1:5998"')
    assert result.returncode == 2
    assert "listen_tls needs the site's certificate" in result.stderr

    account = """
[sip.accounts.pbx]
registrar = "sips:pbx.example.org"
username = "6001"
"""
    result = check(tmp_path, "", account)
    assert result.returncode == 2
    assert "[sip.accounts.pbx] uses TLS" in result.stderr and "listen_tls" in result.stderr

    conflicting = account.replace('username = "6001"', 'username = "6001"\ntransport = "udp"')
    result = check(tmp_path, "", conflicting)
    assert result.returncode == 2
    assert "means tls, but transport is 'udp'" in result.stderr


def test_reload_refuses_a_bad_certificate_and_keeps_running(tmp_path, ca):
    site = ca.issue("gateway.test")
    good = tmp_path / "good.toml"
    good.write_text(SITE.format(sip=tls(site.certificate, site.key), more=""))
    gateway = Gateway(load_config(good))
    other = ca.issue("other.test")
    bad = tmp_path / "bad.toml"
    bad.write_text(SITE.format(sip=tls(site.certificate, other.key), more=""))
    result = gateway.reload(bad)
    assert not result.ok
    assert "does not match" in result.error and str(other.key) in result.error
    assert gateway.config.section("sip").tls_key == site.key
