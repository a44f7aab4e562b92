"""A link tile on the console: two real sites joined by a cross-border link on loopback
(SIP over TLS, as tests/links builds them), the console of one of them in Chromium."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from console_site import CHROMIUM_FLAGS, PASSWORDS, password_hash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "links"))

from trunk_sites import LinkSpec, SiteSpec, make_pki, running, share_state, site_toml  # noqa: E402

from tests.conftest import require_binary  # noqa: E402
from tests.waiting import until


def console_section() -> str:
    return f"""
[web]
host = "127.0.0.1"
port = 0

[console]
ice_addresses = ["127.0.0.1"]

[console.operators.alice]
password_hash = "{password_hash("alice")}"
talk = ["*"]
links = true

[console.operators.bob]
password_hash = "{password_hash("bob")}"
monitor = ["marine"]
"""


async def log_in(browser, url: str, operator: str):  # noqa: ANN001, ANN201
    page = await (await browser.new_context()).new_page()
    page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))  # "Cut link us?" → OK
    await page.goto(url)
    await page.fill("#operator", operator)
    await page.fill("#password", PASSWORDS[operator])
    await page.click("#login button[type=submit]")
    return page


def test_link_tile_shows_state_and_cuts_and_restores(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    chromium = require_binary("chromium")
    pki = make_pki(tmp_path, ("ca", "us"))
    ca = SiteSpec("ca", {"marine": 1000.0}, [LinkSpec("us", "us", {"marine": "shiprider"})])
    us = SiteSpec("us", {"harbor": 1500.0}, [LinkSpec("ca", "ca", {"harbor": "shiprider"})])
    ports = {"ca": ca.tls_port, "us": us.tls_port}
    ca_path = site_toml(tmp_path, ca, ports, pki, console_section())
    us_path = site_toml(tmp_path, us, ports, pki)

    async def main() -> None:
        async with running(ca_path) as gw_ca, running(us_path) as gw_us:
            url = f"http://127.0.0.1:{gw_ca.web.port}/console/"
            await until(lambda: share_state(gw_ca, "us", "shiprider") == "up", 20, "link up")
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
                try:
                    alice, bob = (
                        await log_in(browser, url, "alice"),
                        await log_in(browser, url, "bob"),
                    )
                    tile = alice.locator('[data-link="us"]')
                    await tile.filter(has_text="marine as “shiprider”: up").wait_for(timeout=10000)
                    await tile.locator(".link-rtt").filter(has_text="ms").wait_for(timeout=20000)
                    # Bob monitors marine: he sees the link, but has no Cut button.
                    await bob.locator('[data-link="us"]').wait_for(timeout=10000)
                    assert await bob.locator('[data-link="us"] button').count() == 0
                    await alice.get_by_role("button", name="Cut link us").click()
                    await until(
                        lambda: share_state(gw_us, "ca", "shiprider") != "up",
                        10,
                        "the far side to see the cut",
                    )
                    await (
                        tile.filter(has_text="cut")
                        .locator(".restore-button")
                        .wait_for(timeout=5000)
                    )
                    await alice.get_by_role("button", name="Restore link us").click()
                    await until(
                        lambda: share_state(gw_ca, "us", "shiprider") == "up",
                        30,
                        "the link up again",
                    )
                finally:
                    await browser.close()
        audit = [json.loads(x) for x in (tmp_path / "ca-audit.jsonl").read_text().splitlines()]
        cuts = [r for r in audit if r["event"] in ("link_cut", "link_restore")]
        assert [(r["event"], r["who"], r["via"]) for r in cuts] == [
            ("link_cut", "console:alice", "console"),
            ("link_restore", "console:alice", "console"),
        ]

    asyncio.run(main())
