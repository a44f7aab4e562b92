"""One gateway in a process of its own, driven by a test over its stdin and stdout.

    python tests/links/site_process.py SITE.toml

The gateway is the real one (engine, media clock, SIP over TLS, links), built from a
trunk_sites TOML file, so its radios are ``test_link_radio`` ports the test keys and
listens to. Each process has its own clock and scheduler: three of them collide the
way three countries' gateways do, not in one event loop's lockstep.

One JSON object a line in, one a line out (the answer, in order):

- ``{"op": "state"}``: each link's shared names and their state, the holder of each
  shared floor (site, talker ID, key-up ms, emergency) and its label as this site
  knows it, our asking ports' overs
  (talker ID, key-up ms, emergency), and floor events since the start (kind, port,
  talker, detail, wall time);
- ``{"op": "levels", "port": P, "hz": [...], "seconds": S}``: what radio P heard in
  the last S seconds, in dB per frequency (±10 Hz);
- ``{"op": "key", "port": P, "on": bool, "emergency": bool, "at": T}``: radio P
  talks (or not), with its emergency button, at wall time T (now if absent): two
  processes told the same T key in the same moment;
- ``{"op": "audio", "port": P, "seconds": S, "sent": bool}``: the last S seconds radio P
  heard (or sent), float32 in base64;
- ``{"op": "cut", "link": L, "share": N}``: cut link L (or one shared name on it) here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from trunk_sites import RATE, TEST_ENDPOINTS, band_db  # noqa: E402

from gateway.app import Gateway  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.engine import Event  # noqa: E402
from gateway.links.arbiter import Arbiter, talker_label  # noqa: E402
from gateway.links.floor import Candidate  # noqa: E402
from gateway.site import run_async  # noqa: E402

FLOOR_EVENTS = ("floor_granted", "preempted")


def state(gateway: Gateway, events: list[dict]) -> dict:
    links = gateway.links
    shares = {
        link: {name: share.state for name, share in trunk.names.items()}
        for link, trunk in (links.trunks.items() if links is not None else ())
    }
    arbiter = gateway.engine.shared_floors
    holders = {}
    labels = {}
    overs = {}
    if arbiter is not None:
        for group, floor in arbiter.floors.items():
            h = floor.holder
            holders[group] = None if h is None else [h.site, h.talker, h.keyed_at_ms, h.emergency]
            labels[group] = None if h is None else holder_label(gateway, arbiter, h)
        for port, (talker, keyed_at) in arbiter.overs.items():
            emergency = bool(getattr(gateway.ports.get(port), "emergency", False))
            overs[port] = [talker, keyed_at, emergency]
    return {
        "shares": shares,
        "holders": holders,
        "labels": labels,
        "overs": overs,
        "events": events,
        "relaying": dict(arbiter.relaying) if arbiter is not None else {},
    }


def holder_label(gateway: Gateway, arbiter: Arbiter, holder: Candidate) -> str:
    """How this site names the holder: ours by its port, a peer's by the label it sent
    (empty until the label has arrived)."""
    if holder.site == arbiter.site:
        port = next(p for p, over in arbiter.overs.items() if over[0] == holder.talker)
        return talker_label(gateway.ports[port], arbiter.site_name)
    legs = [p for p in gateway.engine.ports if getattr(p, "peer_site", "") == holder.site]
    for leg in gateway.engine.ports:  # a talker a relay passes on names its own site
        onair = getattr(leg, "onair", None)
        heard = onair.heard if onair is not None else None
        if heard is not None and onair.origin(heard) == holder.site:
            legs.append(leg)
    return legs[0].talker if legs else ""


def levels(gateway: Gateway, port: str, hz: list[float], seconds: float) -> list[float]:
    """Level in a band of ±10 Hz: all of a steady tone (a window of 0.4 s or more resolves
    2.5 Hz), but only an eighth of the broadband splash of a concealed late packet."""
    audio = gateway.ports[port].recent(seconds)
    return [band_db(audio, RATE, f, width=10.0) for f in hz]


def key(gateway: Gateway, port: str, on: bool, emergency: bool) -> None:
    radio = gateway.ports[port]
    radio.emergency = emergency
    radio.speaking = on


async def serve(path: Path) -> None:
    gateway = Gateway(load_config(path, TEST_ENDPOINTS))  # with the test_link_radio kind
    events: list[dict] = []

    def record(event: Event) -> None:
        if event.kind in FLOOR_EVENTS:
            events.append(
                {
                    "kind": event.kind,
                    "port": event.port,
                    "talker": event.talker,
                    "group": event.group,
                    "detail": event.detail,
                    "at": time.time(),
                }
            )

    gateway.engine.listeners.append(record)
    task = asyncio.ensure_future(gateway.run())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while not task.done():
            line = await reader.readline()
            if not line:
                break
            command = json.loads(line)
            op = command["op"]
            if op == "state":
                answer = state(gateway, events)
            elif op == "levels":
                answer = {"db": levels(gateway, command["port"], command["hz"], command["seconds"])}
            elif op == "audio":
                radio = gateway.ports[command["port"]]
                audio = radio.recent(command["seconds"], command.get("sent", False))
                answer = {"audio": base64.b64encode(audio.astype("<f4").tobytes()).decode()}
            elif op == "cut":
                gateway.links.cut(command["link"], command.get("share"), "test", "test", "test")
                answer = {"ok": True}
            elif op == "key":
                args = (gateway, command["port"], command["on"], command.get("emergency", False))
                delay = command.get("at", 0.0) - time.time()
                if delay > 0:
                    loop.call_later(delay, key, *args)
                else:
                    key(*args)
                answer = {"ok": True}
            else:
                answer = {"error": f"unknown op {op!r}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        gateway.stop()
        await asyncio.wait_for(task, 10)


if __name__ == "__main__":
    run_async(serve(Path(sys.argv[1])))
