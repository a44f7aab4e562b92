"""The quiet tick against the full tick it stands for.

Most of a site's ticks hear nobody, and nothing carries over from the ticks before (no
talker, nothing keyed, no tone): the engine runs those without the floor, the mix and
the keying (``Engine._quiet_tick``). These tests hold that shortcut to the full tick:
the same audio to every port, the same PTT, events, meters and floor state, tick by
tick, over scripted traffic; and what follows an idle stretch — a squelch opening, a
floor asked for, a hang time running out — comes at the tick the full path gives it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from helpers import TIMING, ScriptedPort, tone_level

from gateway.config import PatchConfig, TalkgroupConfig
from gateway.engine import Engine, Event


class Watched(Engine):
    """The engine as it runs, counting the ticks it ran as quiet ones."""

    quiet = 0

    def _quiet_tick(self, due, isolated) -> None:  # noqa: ANN001 - as the engine's
        self.quiet += 1
        super()._quiet_tick(due, isolated)


class FullTicks(Engine):
    """The reference: every tick a full one (floor, mix, keying, meters)."""

    def _at_rest(self) -> bool:
        return False


def build(engine_type: type[Engine]) -> tuple[Engine, dict[str, ScriptedPort], list[Event]]:
    """Two talkgroups a patch can join: radios (half duplex, hang time, anti-kerchunk,
    TOT), a phone, a listener; courtesy tone on one, talk-permit on the other's single
    floor."""
    ports = {
        "radio_a": ScriptedPort(
            "radio_a", 500, duplex="half", ptt_hang_time="100ms", anti_kerchunk="60ms"
        ),
        "phone": ScriptedPort("phone", 700),
        "listener": ScriptedPort("listener"),
        "radio_c": ScriptedPort("radio_c", 900, duplex="half", tot="1s", ptt_hang_time="60ms"),
        "console": ScriptedPort("console", 1100),
    }
    engine = engine_type(TIMING)
    talkgroups = {
        "east": TalkgroupConfig(members=["radio_a", "phone", "listener"], courtesy_tone=True),
        "west": TalkgroupConfig(
            members=["radio_c", "console"],
            floor="single",
            talk_permit_tone=True,
            priority={"console": 5},
        ),
    }
    patches = {"both": PatchConfig(talkgroups=["east", "west"], enabled=False)}
    engine.configure(list(ports.values()), talkgroups, patches)
    events: list[Event] = []
    engine.listeners.append(events.append)
    return engine, ports, events


def script(seed: int, ticks: int) -> list[dict]:
    """Per tick: who talks, and now and then a patch, a fault or a stray frame. Long
    silences between overs, as on the air, so most ticks are quiet ones."""
    rng = random.Random(seed)
    talkers = ["radio_a", "phone", "radio_c", "console"]
    talking: set[str] = set()
    steps = []
    for _ in range(ticks):
        step: dict = {}
        for name in talkers:
            if name in talking and rng.random() < 0.08:
                talking.discard(name)
            elif name not in talking and rng.random() < 0.004:
                talking.add(name)
        if rng.random() < 0.003:
            step["patch"] = rng.random() < 0.5
        if rng.random() < 0.002:
            step["fail"] = rng.choice(talkers)
        if rng.random() < 0.003:  # a frame handed over without talking (a monitor feed)
            step["stray"] = rng.choice(talkers)
        if rng.random() < 0.01:  # talking, but no frame this tick (a late packet)
            step["gap"] = rng.choice(talkers)
        if rng.random() < 0.01:  # a dispatcher's TX inhibit: tones may play to nobody
            step["inhibit"] = (rng.choice(["phone", "listener", "radio_a"]), rng.random() < 0.6)
        step["talk"] = set(talking)
        steps.append(step)
    return steps


def play(engine: Engine, ports: dict[str, ScriptedPort], step: dict) -> None:
    for name, port in ports.items():
        port.talk = name in step["talk"]
    if "patch" in step:
        engine.set_patch("both", step["patch"], by="test")
    if "fail" in step:
        ports[step["fail"]].fail_reads = 1
    if "stray" in step:
        ports[step["stray"]].next_frame = np.full(TIMING.frame_samples, 0.01, np.float32)
    if "gap" in step:
        ports[step["gap"]].gaps = 1
    if "inhibit" in step:
        engine.set_tx_inhibit(*step["inhibit"])
    engine.tick()


def state(engine: Engine, ports: dict[str, ScriptedPort]) -> dict:
    """What a tick leaves behind that anyone can see or that the next tick uses."""
    keyed = engine.keying.keyed
    return {
        "heard": [None if p.heard[-1] is None else p.heard[-1].tobytes() for p in ports.values()],
        "key_calls": [list(p.key_calls) for p in ports.values()],
        "keyed": keyed.tolist(),
        "quiet_ticks_keyed": engine.keying.quiet_ticks[keyed].tolist(),  # (only keyed ones count)
        "admitted": engine.admitted.tolist(),
        "denied": engine.denied.tolist(),
        "run": engine.floor.run.tolist(),
        "locked": engine.floor.locked.tolist(),
        "holder": engine.floor.holder.tolist(),
        "rx_dbfs": engine.rx_dbfs.tobytes(),
        "tx_dbfs": engine.tx_dbfs.tobytes(),
        "isolated": dict(engine.isolated),
        "tones": (sorted(engine.group_tones), sorted(engine.port_tones)),
    }


def test_quiet_ticks_give_exactly_what_full_ticks_give() -> None:
    steps = script(seed=18, ticks=6000)  # two minutes of a talkgroup pair
    quick, quick_ports, quick_events = build(Watched)
    full, full_ports, full_events = build(FullTicks)
    for k, step in enumerate(steps):
        play(quick, quick_ports, step)
        play(full, full_ports, step)
        assert state(quick, quick_ports) == state(full, full_ports), f"tick {k}"
        assert quick_events == full_events, f"tick {k}"
    kinds = {e.kind for e in full_events}
    # the script covered what the quiet tick must hand back to the full one
    assert {"talk_start", "ptt_on", "ptt_off", "floor_granted", "patch", "fault"} <= kinds
    assert quick.quiet > len(steps) // 3  # …and the shortcut ran often between


def idle_site(floor: str = "mix") -> tuple[Watched, ScriptedPort, ScriptedPort, list[Event]]:
    a = ScriptedPort("a", 500, duplex="half", ptt_hang_time="300ms")
    b = ScriptedPort("b", 700, duplex="half", ptt_hang_time="300ms")
    engine = Watched(TIMING)
    engine.configure([a, b], {"tg": TalkgroupConfig(members=["a", "b"], floor=floor)}, {})
    events: list[Event] = []
    engine.listeners.append(events.append)
    for _ in range(500):  # 10 s of nothing: every meter down, every tick a quiet one
        engine.tick()
    assert engine.quiet == 500
    return engine, a, b, events


def test_a_squelch_opening_on_an_idle_site_is_heard_and_keys_in_that_tick() -> None:
    engine, a, b, events = idle_site()
    a.talk = True
    engine.tick()
    assert tone_level(b.heard[-1], 500) > 0.2 and b.keyed
    assert [(e.kind, e.port, e.tick) for e in events] == [
        ("ptt_on", "b", 500),
        ("talk_start", "a", 500),
    ]
    assert engine.rx_dbfs[0] > -20 and engine.tx_dbfs[1] > -20


def test_floor_and_hang_time_after_an_idle_stretch_then_quiet_again() -> None:
    engine, a, b, events = idle_site(floor="single")
    a.talk = True
    engine.tick()
    b.talk = True  # b's radio keyed by a's audio: half duplex, its squelch is not heard
    for _ in range(10):
        engine.tick()
    assert [e.port for e in events if e.kind == "floor_granted"] == ["a"]
    a.talk = b.talk = False
    hang = round(0.3 / TIMING.frame)
    quiet_before = engine.quiet
    for _ in range(hang):
        engine.tick()
    assert b.keyed and engine.quiet == quiet_before  # hang time: full ticks
    engine.tick()
    assert not b.keyed
    (off,) = [e for e in events if e.kind == "ptt_off"]
    assert off.port == "b" and off.tick == 511 + hang
    engine.tick()
    assert engine.quiet == quiet_before + 1  # at rest again
    b.talk = True  # now b's squelch counts, at once
    engine.tick()
    assert tone_level(a.heard[-1], 700) > 0.2 and a.keyed


def test_a_talker_that_hands_no_frame_is_heard_as_silence_not_its_last_frame() -> None:
    engine, a, b, _ = idle_site()
    a.talk = True
    for _ in range(5):
        engine.tick()
    a.gaps = 1  # its packet is late this tick
    engine.tick()
    assert b.keyed and b.heard[-1] is not None and not b.heard[-1].any()
    engine.tick()
    assert tone_level(b.heard[-1], 500) > 0.2


def test_a_frame_handed_over_without_talking_is_metered_and_checked_on_an_idle_site() -> None:
    engine, a, b, _ = idle_site()
    a.next_frame = np.full(TIMING.frame_samples, 0.1, np.float32)  # a monitor feed: -20 dBFS
    engine.tick()
    assert engine.rx_dbfs[0] == pytest.approx(-20.0, abs=0.01)
    assert b.heard[-1] is None and not b.keyed  # not talking: nobody hears it
    b.next_frame = np.full(TIMING.frame_samples, 3.0, np.float32)  # broken: isolated
    engine.tick()
    assert engine.health["b"].bad_frames == 1 and "b" in engine.isolated
