"""Password hashes for console operators (stdlib scrypt, no extra dependency).

The site file holds only ``scrypt$N$r$p$salt$hash`` strings, so a leaked config
does not leak passwords. Verification is constant-time.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import sys

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1
MIN_LENGTH = 8
MAX_MEMORY = 256 * 1024 * 1024  # scrypt's own limit (32 MB) refuses N ≥ 2^15 with r = 8


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    """A self-describing scrypt hash with a random salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=MAX_MEMORY, dklen=32
    )
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def check_hash_format(stored: str) -> str:
    """'' when ``stored`` looks like one of our hashes, else what is wrong with it."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        return "not a password hash"
    try:
        n, r, p = (int(x) for x in parts[1:4])
        _unb64(parts[4])
        _unb64(parts[5])
    except ValueError:
        return "a damaged password hash"
    if n < 2 or n & (n - 1) or r < 1 or p < 1:
        return "a password hash with impossible scrypt parameters"
    return ""


def verify_password(password: str, stored: str) -> bool:
    if check_hash_format(stored):
        return False
    _, n, r, p, salt, digest = stored.split("$")
    expected = _unb64(digest)
    actual = hashlib.scrypt(
        password.encode(),
        salt=_unb64(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        maxmem=MAX_MEMORY,
        dklen=len(expected),
    )
    return hmac.compare_digest(actual, expected)


def passwd_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stdin", action="store_true", help="read the password from standard input (scripts)"
    )
    parser.add_argument(
        "--sip", metavar="USER", help="a SIP caller's digest line for [sip.routes.N.users] instead"
    )
    parser.add_argument("--realm", default="borderlink", help="the [sip] realm (with --sip)")


def passwd(args: argparse.Namespace) -> int:
    who = f"SIP password for {args.sip}" if args.sip else "New console password"
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"{who}: ")
        if getpass.getpass("Again: ") != password:
            print("the two passwords differ; nothing printed", file=sys.stderr)
            return 2
    if len(password) < MIN_LENGTH:
        print(f"password too short: use at least {MIN_LENGTH} characters", file=sys.stderr)
        return 2
    if args.sip:  # digest needs MD5(user:realm:password), not scrypt: see gateway.sip.digest
        from gateway.sip.digest import sip_user_line

        try:
            print(sip_user_line(args.sip, args.realm, password))
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        return 0
    print(f'password_hash = "{hash_password(password)}"')
    return 0
