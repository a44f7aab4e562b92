"""A scrape of a big site is built between ticks, in slices, so it never holds a tick up.

How late ticks run while scraped is measured by ``bench/monitoring.py --stall`` (a
figure for a quiet machine, not a test); this checks the mechanism.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from live_site import Probe, http_get, live_site
from prometheus_client.parser import text_string_to_metric_families
from test_metrics_live import SITE


class Leg(Probe):
    """A call's port as metrics see it: counters in stats()."""

    kind = "sip"

    def stats(self) -> dict[str, float]:
        return {"packets_in": 100.0, "packets_out": 90.0, "jitter_seconds": 0.002}


def test_a_big_page_is_built_over_several_ticks_and_is_whole(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with live_site(tmp_path, SITE) as gw:
            for i in range(1500):
                gw.engine.attach(Leg(f"call-{i}", gw.config.timing), "marine")
            status, text = await http_get(gw, "/metrics")
            assert status == 200
            metrics = gw.metrics  # type: ignore[attr-defined]
            ticks = metrics.slice_ticks
            # The work was cut into slices, each begun after a tick, and ticks ran between.
            assert len(ticks) >= 3 and ticks == sorted(ticks) and ticks[-1] > ticks[0], ticks
            families = {f.name: f for f in text_string_to_metric_families(text)}
            up = {s.labels["port"] for s in families["borderlink_port_up"].samples}
            assert {f"call-{i}" for i in range(1500)} | {"boat", "shore", "beacon"} <= up
            packets = families["borderlink_leg_packets_in"].samples
            assert len(packets) == 1500 and all(s.value == 100.0 for s in packets)

    asyncio.run(scenario())
