"""What a flood of console logins costs the media clock, password hashing on and off the loop.

    .venv/bin/python bench/login_flood.py                 # 40 logins at once, 3 runs each way
    .venv/bin/python bench/login_flood.py --logins 200 --runs 5

A gateway with a radio talking and a console operator whose password hash is scrypt
N=2^14 (the default of ``borderlink passwd``) gets ``--logins`` wrong-password logins at
once from 127.0.0.1, each for a different unknown name (the address-wide lockout stops
them after 4 × login_attempts, as it would an attacker's spray). Printed per mode: the
answers, ticks late (> one period) and skipped during the flood, and the longest time the
event loop was away (a 5 ms timer). "on the loop" is the design before hashing moved to
worker threads (``verify_password`` called in the request handler); "threads" is the
gateway as it is. Late ticks also come from the machine's own load: run it on a quiet
machine, or compare the two modes run for run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.app import Gateway  # noqa: E402
from gateway.site import load_site  # noqa: E402
from gateway.webrtc import auth  # noqa: E402
from gateway.webrtc.passwords import hash_password  # noqa: E402

SITE = """
[site]
name = "bench"
country = "US"

[web]
host = "127.0.0.1"
port = 0

[console]
login_attempts = 100

[console.operators.alice]
password_hash = "{hash}"
talk = ["marine"]

[ports.tone]
kind = "tone"
tone_hz = 1000

[ports.radio]
kind = "simulated_radio"

[talkgroups.marine]
members = ["tone", "radio"]
"""


async def on_the_loop(self: auth.Hasher, password: str, stored: str | None) -> bool:
    """The old way: scrypt in the request handler, on the event loop."""
    return auth._check(password, stored)


async def flood(logins: int, inline: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "site.toml"
        path.write_text(SITE.format(hash=hash_password("alice-secret-1")))
        saved = auth.Hasher.verify
        if inline:
            auth.Hasher.verify = on_the_loop  # type: ignore[method-assign]
        gateway = Gateway(load_site(path))
        run = asyncio.ensure_future(gateway.run())
        try:
            while not getattr(getattr(gateway, "web", None), "port", None):
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the clock settles
            base = f"http://127.0.0.1:{gateway.web.port}"
            clock = gateway.clock
            late0, skipped0 = clock.late_ticks, clock.skipped_ticks
            gap = [0.0]

            async def probe() -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.005)
                    now = time.monotonic()
                    gap[0], last = max(gap[0], now - last), now

            watching = asyncio.ensure_future(probe())
            started = time.monotonic()
            async with aiohttp.ClientSession() as http:

                async def attempt(k: int) -> int:
                    body = {"operator": f"nobody{k}", "password": "guess"}
                    async with http.post(f"{base}/api/console/login", json=body) as r:
                        return r.status

                statuses = await asyncio.gather(*(attempt(k) for k in range(logins)))
            seconds = time.monotonic() - started
            watching.cancel()
            return {
                "401": statuses.count(401),
                "429": statuses.count(429),
                "503": statuses.count(503),
                "seconds": seconds,
                "late": clock.late_ticks - late0,
                "skipped": clock.skipped_ticks - skipped0,
                "gap_ms": gap[0] * 1000,
            }
        finally:
            gateway.stop()
            await asyncio.wait_for(run, 10)
            auth.Hasher.verify = saved  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.logins} logins at once, scrypt N=2^14; {args.runs} runs each way\n")
    print("| hashing | 401 / 429 / 503 | flood s | ticks late | ticks skipped | longest loop gap |")
    print("|---|---|---|---|---|---|")
    for _ in range(args.runs):
        for inline in (True, False):
            r = asyncio.run(flood(args.logins, inline))
            mode = "on the loop" if inline else "2 threads, nice 10"
            print(
                f"| {mode} | {r['401']} / {r['429']} / {r['503']} | {r['seconds']:.2f} | "
                f"{r['late']} | {r['skipped']} | {r['gap_ms']:.0f} ms |"
            )


if __name__ == "__main__":
    main()
