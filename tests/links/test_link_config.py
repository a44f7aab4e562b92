"""``[links]``: a good link parses; every bad one is named by `borderlink check` with the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from certs import Identity, make_identity

from gateway.config import ConfigError, parse_config
from gateway.links.config import (
    LinkConfig,
    LinksConfig,
    certificate_fingerprint,
    normalise_fingerprint,
    site_id,
    split_address,
)

HEAD = """
[site]
name = "Blaine CA"
country = "CA"

[ports.radio]
kind = "simulated_radio"

[ports.harbour_radio]
kind = "simulated_radio"

[talkgroups.shiprider]
members = ["radio"]

[talkgroups.harbour]
members = ["harbour_radio"]
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_identity(folder, "us-agency-ca", ca=True, days=365)
    mine, _ = make_identity(folder, "ca-gw")
    peer, _ = make_identity(folder, "us-gw", issuer=ca, issuer_key=ca_key)
    expired, _ = make_identity(folder, "expired", starts_in_days=-10, days=5)
    future, _ = make_identity(folder, "future", starts_in_days=3)
    locked, _ = make_identity(folder, "locked", passphrase=b"secret")
    return {
        "ca": ca,
        "mine": mine,
        "peer": peer,
        "expired": expired,
        "future": future,
        "locked": locked,
    }


def site(pki: dict[str, Identity], link: str = "", **keys: str) -> str:
    values = {
        "peer": '"127.0.0.1:5061"',
        "certificate": f'"{pki["mine"].certificate}"',
        "key": f'"{pki["mine"].key}"',
        "peer_ca": f'"{pki["ca"].certificate}"',
        **keys,
    }
    body = "\n".join(f"{k} = {v}" for k, v in values.items() if v)
    share = link or 'shiprider = { as = "marine", direction = "both" }\nharbour = "port-ops"'
    links = f'[links]\nsite_id = "ca-bc"\n\n[links.us]\n{body}\n\n[links.us.share]\n{share}\n'
    return f"{HEAD}\n{links}\n{sip_tls(pki)}"


def sip_tls(pki: dict[str, Identity]) -> str:
    """Links run on the SIP stack's TLS listener."""
    return (
        f'[sip]\nlisten_tls = "127.0.0.1:5061"\ntls_certificate = "{pki["mine"].certificate}"'
        f'\ntls_key = "{pki["mine"].key}"\n'
    )


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "site.toml")
    return [p.render("site.toml") for p in info.value.problems]


def line_of(text: str, fragment: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if fragment in line)


def test_a_good_link_parses_with_shares_and_shorthand(pki: dict[str, Identity]) -> None:
    fingerprint = certificate_fingerprint(pki["peer"].cert).upper()
    pinned = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2))
    config = parse_config(site(pki, backup='"[::1]:5062"', peer_fingerprints=f'["{pinned}"]'))
    links: LinksConfig = config.section("links")
    link: LinkConfig = links.links["us"]
    assert links.site_id == "ca-bc" and site_id(config) == "ca-bc"
    assert link.addresses == [("127.0.0.1", 5061), ("::1", 5062)]
    assert link.expected_peer_name == "127.0.0.1"
    assert link.peer_fingerprints == [fingerprint.lower()]
    assert link.share["shiprider"].shared == "marine"
    assert link.share["harbour"].shared == "port-ops"  # the string shorthand
    assert link.share["harbour"].direction == "both"
    shares = link.shares()
    assert shares.names == {"marine", "port-ops"}
    assert shares.talkgroup("marine") == "shiprider"
    assert links.talkgroup_references() == [
        (("us", "share", "shiprider"), "shiprider"),
        (("us", "share", "harbour"), "harbour"),
    ]


def test_site_id_defaults_to_the_site_name_made_safe(pki: dict[str, Identity]) -> None:
    config = parse_config(site(pki).replace('site_id = "ca-bc"\n', ""))
    assert site_id(config) == "Blaine-CA"


def test_a_disabled_share_is_not_offered(pki: dict[str, Identity]) -> None:
    text = site(pki, 'shiprider = { as = "marine", direction = "send", enabled = false }')
    link = parse_config(text).section("links").links["us"]
    assert link.shares().names == frozenset()


def test_unknown_talkgroup_is_named_with_line_and_suggestion(pki: dict[str, Identity]) -> None:
    text = site(pki, 'shiprider = "marine"\nharbor = "port-ops"')
    (only,) = problems(text)
    assert only.startswith(f"site.toml:{line_of(text, 'harbor =')}: links.us.share.harbor:")
    assert "no talkgroup named 'harbor'; did you mean 'harbour'?" in only


def test_a_shared_name_used_twice_is_refused(pki: dict[str, Identity]) -> None:
    text = site(pki, 'shiprider = "marine"\nharbour = { as = "marine", direction = "send" }')
    (only,) = problems(text)
    assert only.startswith(f"site.toml:{line_of(text, '[links.us.share]')}: links.us.share:")
    assert "'marine' is used twice" in only and "'shiprider' and 'harbour'" in only


def test_shared_names_and_directions_are_checked(pki: dict[str, Identity]) -> None:
    text = site(pki, 'shiprider = { as = "Marine Ops", direction = "sideways" }')
    found = problems(text)
    assert any("links.us.share.shiprider.as: a shared name is 1-32 lower-case" in p for p in found)
    assert any("links.us.share.shiprider.direction:" in p and "'both'" in p for p in found)


def test_misspelt_keys_get_a_suggestion_inside_a_link(pki: dict[str, Identity]) -> None:
    text = site(pki, 'shiprider = { ass = "marine" }', peer_fingerprnts='["00"]')
    found = problems(text)
    assert any(
        "links.us.peer_fingerprnts: unknown key; did you mean 'peer_fingerprints'" in p
        for p in found
    )
    assert any("links.us.share.shiprider.ass: unknown key; did you mean 'as'" in p for p in found)


def test_a_link_is_never_unauthenticated(pki: dict[str, Identity]) -> None:
    text = site(pki, peer_ca="")
    (only,) = problems(text)
    assert only.startswith(f"site.toml:{line_of(text, '[links.us]')}: links.us:")
    assert "never unauthenticated" in only and "peer_ca" in only and "peer_fingerprints" in only


def test_codecs_default_to_opus_then_pcmu_and_must_keep_pcmu(pki: dict[str, Identity]) -> None:
    assert parse_config(site(pki)).section("links").links["us"].codecs == ["opus", "pcmu"]
    text = site(pki, codecs='["pcmu"]')
    assert parse_config(text).section("links").links["us"].codecs == ["pcmu"]
    text = site(pki, codecs='["opus"]')
    (only,) = problems(text)
    assert only.startswith(f"site.toml:{line_of(text, 'codecs =')}: links.us.codecs:")
    assert "always offered" in only and '["opus", "pcmu"]' in only
    (only,) = problems(site(pki, codecs='["opus", "g722", "pcmu"]'))
    assert "unknown codec 'g722'" in only


def test_bad_fingerprint_and_address_say_how_to_write_them(pki: dict[str, Identity]) -> None:
    text = site(pki, peer='"gw.example.us"', peer_fingerprints='["sha256:abcd"]')
    found = problems(text)
    assert any("links.us.peer: write the address as 'host:port'" in p for p in found)
    assert any(
        "links.us.peer_fingerprints.0: 'sha256:abcd' is not a SHA-256 fingerprint" in p
        and "openssl" in p
        for p in found
    )


@pytest.mark.parametrize(
    ("keys", "where", "says"),
    [
        (
            {"certificate": '"/nonexistent/link.pem"'},
            "certificate",
            "certificate '/nonexistent/link.pem' does not exist",
        ),
        ({"certificate": "KEY"}, "certificate", "holds no PEM certificate"),
        ({"certificate": "EXPIRED", "key": "EXPIRED_KEY"}, "certificate", "expired on"),
        ({"certificate": "FUTURE", "key": "FUTURE_KEY"}, "certificate", "is not valid before"),
        ({"key": "DIR"}, "key", "is a directory, not a PEM file"),
        ({"key": "PEER_KEY"}, "key", "does not match certificate"),
        ({"key": "CERT"}, "key", "holds no PEM private key"),
        ({"key": "LOCKED_KEY", "certificate": "LOCKED"}, "key", "protected by a passphrase"),
        ({"peer_ca": "EXPIRED"}, "peer_ca", "(CN=expired) expired on"),
    ],
)
def test_tls_files_that_do_not_load_are_named(
    pki: dict[str, Identity], tmp_path: Path, keys: dict[str, str], where: str, says: str
) -> None:
    files = {
        "KEY": pki["mine"].key,
        "CERT": pki["mine"].certificate,
        "DIR": tmp_path,
        "EXPIRED": pki["expired"].certificate,
        "EXPIRED_KEY": pki["expired"].key,
        "FUTURE": pki["future"].certificate,
        "FUTURE_KEY": pki["future"].key,
        "PEER_KEY": pki["peer"].key,
        "LOCKED": pki["locked"].certificate,
        "LOCKED_KEY": pki["locked"].key,
    }
    values = {k: f'"{files[v]}"' if v in files else v for k, v in keys.items()}
    text = site(pki, **values)
    (only,) = problems(text)
    assert only.startswith(f"site.toml:{line_of(text, f'{where} =')}: links.us.{where}:"), only
    assert says in only, only


def test_a_plain_key_under_links_is_a_typo(pki: dict[str, Identity]) -> None:
    (only,) = problems(site(pki).replace('site_id = "ca-bc"', 'siteid = "ca-bc"'))
    assert "links:" in only and "'siteid' is neither 'site_id', 'relay' nor a link" in only


def test_address_and_fingerprint_helpers() -> None:
    assert split_address("gw.example.org:5061") == ("gw.example.org", 5061)
    assert split_address("[2001:db8::1]:5061") == ("2001:db8::1", 5061)
    for bad in ("gw.example.org", "gw:0", "gw:70000", "a b:1", "2001:db8::1:5061"):
        with pytest.raises(ValueError, match="host:port"):
            split_address(bad)
    hexdigits = "AB" * 32
    assert normalise_fingerprint(f"SHA256:{':'.join(['AB'] * 32)}") == hexdigits.lower()
    assert normalise_fingerprint(hexdigits) == hexdigits.lower()
    pasted = f"sha256 Fingerprint={':'.join(['AB'] * 32)}"  # openssl's own output line
    assert normalise_fingerprint(pasted) == hexdigits.lower()
    with pytest.raises(ValueError):
        normalise_fingerprint("AB" * 31)


def test_borderlink_check_names_the_problems_and_passes_once_fixed(
    pki: dict[str, Identity], tmp_path: Path
) -> None:
    """The real command: exit 2 with each problem and its line; 0 when the file is fixed."""
    bad = site(pki, 'shiprider = "marine"\nharbor = "marine"', key=f'"{pki["peer"].key}"')
    path = tmp_path / "site.toml"
    path.write_text(bad)
    command = [sys.executable, "-m", "gateway.cli", "check", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "links.us.key: key " in result.stderr and "does not match" in result.stderr
    assert f":{line_of(bad, '[links.us.share]')}: links.us.share: shared name 'marine'" in (
        result.stderr
    )
    path.write_text(site(pki))
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "[links] configured" in result.stdout
    pin = certificate_fingerprint(pki["mine"].cert).upper()
    assert f"SHA-256 {':'.join(pin[i : i + 2] for i in range(0, 64, 2))}" in result.stdout
    assert "shares shiprider as 'marine' (both)" in result.stdout


def test_a_link_needs_the_sip_tls_listener(pki: dict[str, Identity]) -> None:
    text = site(pki).replace(sip_tls(pki), "")
    found = problems(text)
    assert any("links run over SIP TLS: add [sip] with listen_tls" in p for p in found), found


def test_relay_names_a_talkgroup_shared_on_two_links(pki: dict[str, Identity]) -> None:
    """``relay`` lists local talkgroups: one that does not exist gets a did-you-mean, one
    shared on fewer than two links says why and the fix; on two links it parses."""
    one = site(pki).replace('site_id = "ca-bc"', 'site_id = "ca-bc"\nrelay = ["shiprider"]')
    (only,) = problems(one)
    assert "relay names talkgroup 'shiprider' but only link 'us' shares it" in only
    assert "share it on each" in only
    typo = site(pki).replace('site_id = "ca-bc"', 'site_id = "ca-bc"\nrelay = ["shiprdier"]')
    assert any("shiprdier" in p for p in problems(typo))
    second = one.replace(
        "[sip]",
        '[links.mx]\npeer = "127.0.0.1:5071"\n'
        f'certificate = "{pki["mine"].certificate}"\nkey = "{pki["mine"].key}"\n'
        f'peer_ca = "{pki["ca"].certificate}"\n\n[links.mx.share]\n'
        'shiprider = { as = "marine", onward = false }\n\n[sip]',
        1,
    )
    links: LinksConfig = parse_config(second).section("links")
    assert links.relay == ["shiprider"]
    assert links.links["mx"].share["shiprider"].onward is False
    assert links.links["us"].share["shiprider"].onward is True
    assert "relays shiprider between its links" in links.summary_lines()[0]
