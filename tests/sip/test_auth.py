"""Who may call: digest challenges, allow-lists on proven identities, trusted proxies, caps.

The attacker here is a raw UDP socket in the test writing its own INVITEs (any From,
any P-Asserted-Identity, replayed credentials), each from its own loopback address
(127.0.0.x) so per-source limits of one case do not spill into another. The good
callers are real: baresip answering the 401 with its account's password, and
kamailio relaying a phone's call as the route's trusted proxy. Digest answers are
computed here with hashlib, independently of the gateway's code.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from sip_peers import Kamailio, band_db, dominant_hz, run, running_gateway, tone
from test_calls import RATE, legs, recorded, site

from tests.waiting import until

REALM = "borderlink"
GOOD = "correct-horse-battery"


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # noqa: S324 - SIP digest is MD5


def ha1(user: str, realm: str, password: str) -> str:
    return md5(f"{user}:{realm}:{password}")


def users(*names: str) -> str:
    """The route's users table: each user's password is GOOD-NAME."""
    lines = ", ".join(f'{n} = "{ha1(n, REALM, f"{GOOD}-{n}")}"' for n in names)
    return f"users = {{ {lines} }}"


class Uac:
    """A hand-written SIP caller on its own loopback address: INVITEs exactly as we write them."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        # One media port per call, as phones do: a second call naming a media address
        # another call already uses is refused (488).
        self.media: dict[str, socket.socket] = {}

    def rtp_for(self, call_id: str) -> socket.socket:
        if call_id not in self.media:
            rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rtp.bind((self.host, 0))
            rtp.setblocking(False)
            self.media[call_id] = rtp
        return self.media[call_id]

    def invite(
        self,
        gateway_port: int,
        number: str,
        caller: str = "alice",
        call_id: str | None = None,
        cseq: int = 1,
        headers: tuple[str, ...] = (),
    ) -> tuple[str, str]:
        """Send an INVITE; (its Call-ID, the request's text)."""
        call_id = call_id or f"{secrets.token_hex(8)}@{self.host}"
        body = (
            f"v=0\r\no=- 1 1 IN IP4 {self.host}\r\ns=-\r\nc=IN IP4 {self.host}\r\nt=0 0\r\n"
            f"m=audio {self.rtp_for(call_id).getsockname()[1]} RTP/AVP 0 101\r\n"
            "a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
        )
        text = (
            f"INVITE sip:{number}@127.0.0.1:{gateway_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {self.host}:{self.port};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
            f"From: <sip:{caller}@{self.host}>;tag={secrets.token_hex(4)}\r\n"
            f"To: <sip:{number}@127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\n"
            f"Contact: <sip:{caller}@{self.host}:{self.port}>\r\nMax-Forwards: 70\r\n"
            + "".join(f"{h}\r\n" for h in headers)
            + f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        )
        self.sock.sendto(text.encode(), ("127.0.0.1", gateway_port))
        return call_id, text

    async def final(self, call_id: str, timeout: float = 5.0) -> str:
        """The final response to our request with this Call-ID (1xx skipped)."""

        def received() -> str | None:
            while True:
                try:
                    text = self.sock.recv(65535).decode()
                except BlockingIOError:
                    return None
                if call_id in text and int(text.split(" ", 2)[1]) >= 200:
                    return text

        return await until(received, timeout, f"a final response to {call_id}")

    def close(self) -> None:
        self.sock.close()
        for rtp in self.media.values():
            rtp.close()


def status(response: str) -> int:
    return int(response.split(" ", 2)[1])


def header(response: str, name: str) -> str:
    match = re.search(rf"^{name}\s*:\s*(.+?)\r?$", response, re.M | re.I)
    assert match, f"no {name} in {response!r}"
    return match.group(1)


def answer(challenge: str, user: str, password: str, uri: str, qop: bool) -> str:
    """The Authorization header for a WWW-Authenticate challenge (RFC 2617, MD5)."""
    params = dict(re.findall(r'(\w+)="?([^",]+)"?', challenge))
    a1 = md5(f"{user}:{params['realm']}:{password}")
    a2 = md5(f"INVITE:{uri}")
    nonce = params["nonce"]
    base = f'Digest username="{user}", realm="{params["realm"]}", nonce="{nonce}", uri="{uri}"'
    if qop:
        cnonce, nc = secrets.token_hex(4), "00000001"
        response = md5(f"{a1}:{nonce}:{nc}:{cnonce}:auth:{a2}")
        return f'{base}, qop=auth, nc={nc}, cnonce="{cnonce}", response="{response}"'
    return f'{base}, response="{md5(f"{a1}:{nonce}:{a2}")}", algorithm=MD5'


def test_digest_route_challenges_refuses_wrong_and_replayed_answers_admits_right(tmp_path):
    route = f'auth = "digest"\n{users("alice", "bob")}'
    # Many INVITEs from one address here: the rate limit is another test's subject.
    toml = site(tmp_path, None, route=route).replace("[sip]\n", "[sip]\ninvite_rate = 100.0\n", 1)

    async def scenario() -> None:
        async with running_gateway(toml) as gw:
            port = gw.sip.port
            uri = f"sip:6001@127.0.0.1:{port}"
            uac = Uac("127.0.0.11")
            # No credentials: challenged, no call.
            call_id, _ = uac.invite(port, "6001")
            challenged = await uac.final(call_id)
            assert status(challenged) == 401, challenged
            challenge = header(challenged, "WWW-Authenticate")
            assert 'realm="borderlink"' in challenge and 'qop="auth"' in challenge
            assert not legs(gw)
            # Broken credentials are no credentials: a challenge, never an exception.
            for junk in ("Digest username=", "Digest =", "Digest ,,,", 'Digest realm="', "Basic x"):
                call_id, _ = uac.invite(port, "6001", headers=(f"Authorization: {junk}",))
                assert status(await uac.final(call_id)) == 401, junk
            # The right answer, with and without qop: two calls.
            for qop in (True, False):
                call_id, _ = uac.invite(port, "6001")
                challenge = header(await uac.final(call_id), "WWW-Authenticate")
                auth = answer(challenge, "alice", f"{GOOD}-alice", uri, qop)
                uac.invite(
                    port, "6001", call_id=call_id, cseq=2, headers=(f"Authorization: {auth}",)
                )
                assert status(await uac.final(call_id)) == 200
            assert len(legs(gw)) == 2
            # The same (proven) answer on a new call is a replay: challenged again.
            replay, _ = uac.invite(port, "6001", headers=(f"Authorization: {auth}",))
            assert status(await uac.final(replay)) == 401
            # A wrong password: 403, and the address is backed off (503 + Retry-After).
            call_id, _ = uac.invite(port, "6001")
            challenge = header(await uac.final(call_id), "WWW-Authenticate")
            wrong = answer(challenge, "alice", "guess", uri, True)
            uac.invite(port, "6001", call_id=call_id, cseq=2, headers=(f"Authorization: {wrong}",))
            assert status(await uac.final(call_id)) == 403
            after, _ = uac.invite(port, "6001")
            busy = await uac.final(after)
            assert status(busy) == 503 and int(header(busy, "Retry-After")) > 0
            assert len(legs(gw)) == 2
            # Another address is not affected; a user the route does not know is refused.
            other = Uac("127.0.0.12")
            call_id, _ = other.invite(port, "6001")
            challenge = header(await other.final(call_id), "WWW-Authenticate")
            mallory = answer(challenge, "mallory", "anything", uri, True)
            other.invite(
                port, "6001", call_id=call_id, cseq=2, headers=(f"Authorization: {mallory}",)
            )
            assert status(await other.final(call_id)) == 403
            # A nonce given to one address does not work from another.
            third = Uac("127.0.0.13")
            stolen = answer(challenge, "bob", f"{GOOD}-bob", uri, True)
            call_id, _ = third.invite(port, "6001", headers=(f"Authorization: {stolen}",))
            assert status(await third.final(call_id)) == 401
            stats = gw.sip.stats()  # what /metrics shows
            assert stats["sip_sources_backed_off"] == 2  # .11 (wrong password), .12 (mallory)
            assert stats["sip_calls_refused"]["403"] == 2
            for u in (uac, other, third):
                u.close()

    run(scenario())


def test_spoofed_from_or_asserted_identity_does_not_pass_an_allow_list(tmp_path):
    """The allow-list matches the digest user, never the From the caller wrote; a
    P-Asserted-Identity counts only from a trusted proxy (RFC 3325)."""
    route = f'auth = "digest"\n{users("alice", "bob")}\nallow = ["alice"]'
    extra = """
[sip.routes."6100"]
talkgroup = "marine"
trusted = ["127.0.0.50"]
allow = ["alice@*"]
"""

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, None, route=route, extra=extra)) as gw:
            port = gw.sip.port
            uri = f"sip:6001@127.0.0.1:{port}"
            bob = Uac("127.0.0.21")
            # Bob proves he is bob but writes From: alice.
            call_id, _ = bob.invite(port, "6001", caller="alice")
            challenge = header(await bob.final(call_id), "WWW-Authenticate")
            auth = answer(challenge, "bob", f"{GOOD}-bob", uri, True)
            bob.invite(
                port,
                "6001",
                caller="alice",
                call_id=call_id,
                cseq=2,
                headers=(f"Authorization: {auth}",),
            )
            assert status(await bob.final(call_id)) == 403
            # Alice proves she is alice (From says bob: it does not matter).
            alice = Uac("127.0.0.22")
            call_id, _ = alice.invite(port, "6001", caller="bob")
            challenge = header(await alice.final(call_id), "WWW-Authenticate")
            auth = answer(challenge, "alice", f"{GOOD}-alice", uri, False)
            alice.invite(
                port,
                "6001",
                caller="bob",
                call_id=call_id,
                cseq=2,
                headers=(f"Authorization: {auth}",),
            )
            assert status(await alice.final(call_id)) == 200
            # Straight to the trusted-only route with a forged asserted identity: refused.
            forger = Uac("127.0.0.23")
            pai = ("P-Asserted-Identity: <sip:alice@127.0.0.50>",)
            call_id, _ = forger.invite(port, "6100", caller="alice", headers=pai)
            assert status(await forger.final(call_id)) == 403
            # From the trusted proxy, the asserted identity is believed and matched.
            proxy = Uac("127.0.0.50")
            call_id, _ = proxy.invite(port, "6100", caller="whoever", headers=pai)
            assert status(await proxy.final(call_id)) == 200
            other = ("P-Asserted-Identity: <sip:mallory@127.0.0.50>",)
            call_id, _ = proxy.invite(port, "6100", caller="alice", headers=other)
            assert status(await proxy.final(call_id)) == 403
            assert len(legs(gw)) == 2
            # Leg names say the route, not the caller.
            assert sorted(leg.name.split("#")[0] for leg in legs(gw)) == ["sip-6001", "sip-6100"]
            for u in (bob, alice, forger, proxy):
                u.close()

    run(scenario())


def test_baresip_with_its_password_gets_in_hears_and_is_heard(phones, tmp_path):
    source = np.concatenate([np.zeros(RATE), tone(600, 9)])
    good = phones("alice", source, password=f"{GOOD}-alice")
    route = f'auth = "digest"\n{users("alice")}\nallow = ["alice"]'

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, None, route=route)) as gw:
            good.start(dial=f"sip:6001@127.0.0.1:{gw.sip.port}", seconds=5)
            await until(lambda: legs(gw), 8, "the authenticated call")
            await until(lambda: not good.running(), 12, "the phone to hang up")
            assert gw.sip.calls.rejected.get(401, 0) >= 1, "the phone was not challenged"

    run(scenario())
    heard = good.heard()[RATE : -RATE // 2]
    assert abs(dominant_hz(heard, RATE) - 1000) < 15, "the phone does not hear the radio"
    assert band_db(heard, RATE, 1000) > -20
    assert band_db(recorded(tmp_path / "talkgroup"), 16000, 600) > -30, "phone not heard"


def test_route_trusted_to_the_proxy_takes_its_calls_and_refuses_the_same_call_direct(
    phones, tmp_path
):
    proxy = Kamailio(tmp_path, host="127.0.0.2")
    proxy.start()
    route = 'trusted = ["127.0.0.2"]'
    try:
        relayed = phones(
            "viaproxy", tone(600, 8), registrar_port=proxy.port, registrar_host="127.0.0.2"
        )
        direct = phones("direct", tone(600, 8))
        toml = site(tmp_path, proxy.port, route=route).replace(
            'registrar = "127.0.0.1:', 'registrar = "127.0.0.2:'
        )

        async def scenario() -> None:
            async with running_gateway(toml) as gw:
                await asyncio.wait_for(gw.sip.registrations["marine"].registered.wait(), 5)
                relayed.start(dial=f"sip:6001@127.0.0.2:{proxy.port}", seconds=4)
                leg = (await until(lambda: legs(gw), 8, "the relayed call"))[0]
                dialog = next(iter(gw.sip.calls.dialogs.values()))
                assert dialog.peer.address[0] == "127.0.0.2"
                await until(lambda: leg.stats()["packets_in"] > 50, 5, "the relayed call's audio")
                await until(lambda: not relayed.running(), 10, "the relayed call to end")
                direct.start(dial=f"sip:6001@127.0.0.1:{gw.sip.port}", seconds=4)
                await until(lambda: "403 Forbidden" in direct.output(), 10, "the direct refusal")
                assert gw.sip.calls.rejected.get(403) == 1

        run(scenario())
    finally:
        proxy.stop()


def test_call_caps_and_invite_rate_answer_503_with_retry_after(tmp_path):
    limits = "max_calls = 4\nmax_calls_per_source = 2\ninvite_rate = 2.0\n"
    toml = site(tmp_path, None).replace("[sip]\n", f"[sip]\n{limits}", 1)

    async def scenario() -> None:
        async with running_gateway(toml) as gw:
            port = gw.sip.port
            # A burst of INVITEs from one address: the rate limit answers 503 before routing
            # (the bucket holds twice the rate: 4).
            burst = Uac("127.0.0.34")
            ids = [burst.invite(port, "9999")[0] for _ in range(20)]
            answers = [status(await burst.final(i)) for i in ids]
            assert 4 <= answers.count(404) <= 6 and answers.count(503) >= 14, answers
            one = Uac("127.0.0.31")
            codes = []
            for _ in range(3):  # the bucket holds 4 (twice the rate): no rate refusal yet
                call_id, _ = one.invite(port, "7001")
                response = await one.final(call_id)
                codes.append(status(response))
            assert codes == [200, 200, 503], codes
            assert int(header(response, "Retry-After")) > 0
            # Other addresses fill the site up to max_calls; then the site is full.
            two = Uac("127.0.0.32")
            for expected in (200, 200, 503):
                call_id, _ = two.invite(port, "7001")
                response = await two.final(call_id)
                assert status(response) == expected
            three = Uac("127.0.0.33")
            call_id, _ = three.invite(port, "7001")
            full = await three.final(call_id)
            assert status(full) == 503 and int(header(full, "Retry-After")) > 0
            assert len(legs(gw)) == 4
            assert gw.sip.stats()["sip_calls_refused"]["503"] == answers.count(503) + 3
            for u in (one, two, three, burst):
                u.close()

    run(scenario())


def test_refusals_are_logged_once_per_source_with_a_count(tmp_path, caplog):
    from gateway.sip.admission import RefusalLog

    async def scenario() -> None:
        async with running_gateway(site(tmp_path, None)) as gw:
            uac = Uac("127.0.0.41")
            ids = [uac.invite(gw.sip.port, "9999")[0] for _ in range(50)]
            for i in ids:
                await uac.final(i)
            uac.close()

    with caplog.at_level(logging.WARNING, logger="gateway.sip"):
        run(scenario())
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in refused]
    # The count comes once the minute is over (a clock we turn, the real log).
    clock = [0.0]
    refusals = RefusalLog(now=lambda: clock[0])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.sip"):
        for _ in range(13):
            refusals("192.0.2.7", 404, "Not Found", "no route")
        clock[0] = 61.0
        refusals("192.0.2.8", 404, "Not Found", "no route")
    lines = [r.getMessage() for r in caplog.records]
    assert "12 more refusals from 192.0.2.7 in the last 60 s" in lines, lines
    assert len(lines) == 3, lines
    # A flood from many addresses: 20 are named, the rest share one summary line.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.sip"):
        for k in range(1000):
            refusals(f"198.51.100.{k % 250}", 404, "Not Found", "no route")
        clock[0] = 122.0
        refusals("192.0.2.9", 404, "Not Found", "no route")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) <= 20 + 20 + 2, lines
    named = sum(1 for line in lines if line.startswith("call from 198.51.100."))
    counted = sum(
        int(line.split()[0])
        for line in lines
        if re.match(r"\d+ (more )?refusals from (198\.51\.100\.|other addresses)", line)
    )
    assert any("refusals from other addresses in the last 60 s" in line for line in lines)
    assert named + counted == 1000, lines  # every refusal is told, in a line or a count


def test_check_refuses_a_route_that_does_not_say_who_may_call(tmp_path: Path):
    bad = tmp_path / "site.toml"
    bad.write_text(
        site(tmp_path, None).replace(
            'talkgroup = "marine"\npublic = true\n', 'talkgroup = "marine"\n'
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "sip.routes.6001" in result.stderr
    for fix in ('auth = "digest"', "trusted", "public = true", "borderlink passwd --sip"):
        assert fix in result.stderr, result.stderr
    # A password where the hash belongs is refused too, naming the command that makes one.
    plain = site(tmp_path, None, route='auth = "digest"\nusers = { alice = "s3cret" }')
    bad.write_text(plain)
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "borderlink passwd --sip alice" in result.stderr
    assert "s3cret" not in result.stderr, "the check echoed a password"
    made = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "passwd", "--sip", "alice", "--stdin"],
        input="a long password\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    expected = md5(f"alice:{REALM}:a long password")
    assert made.stdout.strip() == f'"alice" = "{expected}"'


def test_an_expired_nonce_is_challenged_again_as_stale():
    """RFC 2617: a right answer to an expired nonce earns a new challenge with stale=true
    (the phone retries at once, without asking its user), never a refusal."""
    from gateway.sip.digest import NONCE_LIFETIME, DigestAuth

    clock = [1000.0]
    auth = DigestAuth(REALM, now=lambda: clock[0])
    table = {"alice": ha1("alice", REALM, "pw")}
    challenge = auth.www_authenticate("192.0.2.1").split(": ", 1)[1]
    good = answer(challenge, "alice", "pw", "sip:6001@gw", qop=True)
    clock[0] += NONCE_LIFETIME + 1
    late = auth.check(good, "INVITE", "192.0.2.1", "call-1", table)
    assert late.challenge and late.stale and not late.user
    assert "stale=true" in auth.www_authenticate("192.0.2.1", stale=True)
    fresh = answer(
        auth.www_authenticate("192.0.2.1").split(": ", 1)[1],
        "alice",
        "pw",
        "sip:6001@gw",
        qop=False,
    )
    assert auth.check(fresh, "INVITE", "192.0.2.1", "call-1", table).user == "alice"


def test_a_tls_identity_is_trusted_by_name_and_a_header_never_stands_in_for_it():
    """``trusted = ["tls:NAME"]`` matches only what a TLS transport proved (Source.identity,
    set by the transport after the certificate verified), never an address or a header."""
    from gateway.sip.admission import Admission, Admitted, Refusal
    from gateway.sip.config import SipConfig
    from gateway.sip.message import Headers, Source

    config = SipConfig.model_validate(
        {"routes": {"6001": {"talkgroup": "tg", "trusted": ["tls:pbx.agency.example"]}}}
    )
    gate = Admission(lambda: config, lambda: 0, lambda host: 0)
    route = config.routes["6001"]
    proved = Source(("192.0.2.5", 5061), "tls", "pbx.agency.example")
    claimed = Source(("192.0.2.5", 5061), "tcp")  # same address, nothing proved
    pai = Headers.of(("P-Asserted-Identity", "<sip:pbx.agency.example@192.0.2.5>"))
    admitted = gate.identify("6001", route, proved, "INVITE", "c1", Headers())
    assert admitted == Admitted("pbx.agency.example", "tls")
    refused = gate.identify("6001", route, claimed, "INVITE", "c2", pai)
    assert isinstance(refused, Refusal) and refused.code == 403
    assert gate.limit(proved) is None  # a trusted peer is not rate-limited per address
