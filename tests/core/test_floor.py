"""Floor rules tick by tick: single floor, pre-emption, TOT, kerchunk, hang time, half duplex."""

from __future__ import annotations

from helpers import TIMING, ScriptedPort, tone_level

from gateway.config import TalkgroupConfig
from gateway.engine import Engine, Event

TICK = TIMING.frame


def site(ports, floor="mix", priority=None) -> tuple[Engine, list[Event]]:
    engine = Engine(TIMING)
    tg = TalkgroupConfig(members=[p.name for p in ports], floor=floor, priority=priority or {})
    engine.configure(ports, {"tg": tg}, {})
    events: list[Event] = []
    engine.listeners.append(events.append)
    return engine, events


def run(engine: Engine, ticks: int) -> None:
    for _ in range(ticks):
        engine.tick()


def test_single_floor_first_talker_holds_others_hear_busy() -> None:
    a, b, c = ScriptedPort("a", 500), ScriptedPort("b", 700), ScriptedPort("c")
    engine, events = site([a, b, c], floor="single")
    a.talk = True
    run(engine, 5)
    b.talk = True
    run(engine, 50)
    heard_c = c.recent_audio(25)
    assert tone_level(heard_c, 500) > 0.2 and tone_level(heard_c, 700) < 1e-4
    busy = b.recent_audio(50)  # b asked for the floor: it hears the busy tone, not a
    assert tone_level(busy, 480) > 0.01 and tone_level(busy, 620) > 0.01
    assert tone_level(busy, 500) < tone_level(busy, 480)
    assert [e.port for e in events if e.kind == "floor_granted"] == ["a"]
    # a lets go: the floor passes to b, still asking
    a.talk = False
    run(engine, 10)
    assert tone_level(c.recent_audio(5), 700) > 0.2
    assert [e.port for e in events if e.kind == "floor_granted"] == ["a", "b"]


def test_higher_priority_preempts() -> None:
    radio, dispatch, listener = (
        ScriptedPort("radio", 500),
        ScriptedPort("dispatch", 900),
        ScriptedPort("l"),
    )
    engine, events = site([radio, dispatch, listener], floor="single", priority={"dispatch": 10})
    radio.talk = True
    run(engine, 10)
    dispatch.talk = True
    run(engine, 20)
    heard = listener.recent_audio(15)
    assert tone_level(heard, 900) > 0.2 and tone_level(heard, 500) < 1e-4
    (pre,) = [e for e in events if e.kind == "preempted"]
    assert pre.port == "radio" and pre.detail == "by dispatch"


def test_tot_cuts_a_stuck_talker_until_it_releases() -> None:
    stuck = ScriptedPort("stuck", 500, tot="1s")
    other = ScriptedPort("other")
    engine, events = site([stuck, other])
    stuck.talk = True
    run(engine, 49)
    assert tone_level(other.recent_audio(5), 500) > 0.2
    run(engine, 10)
    assert [e.port for e in events if e.kind == "tot"] == ["stuck"]
    run(engine, 100)  # still held: still locked out
    assert all(f is None for f in other.heard[-100:])
    stuck.talk = False
    run(engine, 2)
    stuck.talk = True
    run(engine, 5)
    assert tone_level(other.recent_audio(3), 500) > 0.2


def test_anti_kerchunk_ignores_short_bursts() -> None:
    radio = ScriptedPort("radio", 500, anti_kerchunk="200ms")
    other = ScriptedPort("other")
    engine, _ = site([radio, other])
    radio.talk = True
    run(engine, 8)  # 160 ms: a kerchunk
    radio.talk = False
    run(engine, 5)
    assert all(f is None for f in other.heard)
    assert not any(other.key_calls)
    radio.talk = True
    run(engine, 15)
    admitted_from = next(i for i, f in enumerate(other.heard[13:]) if f is not None)
    assert admitted_from == round(0.2 / TICK)  # passed on after exactly the kerchunk time


def test_ptt_hang_time_and_half_duplex() -> None:
    talker = ScriptedPort("talker", 500)
    radio = ScriptedPort("radio", 800, duplex="half", ptt_hang_time="300ms")
    engine, events = site([talker, radio])
    talker.talk = True
    run(engine, 10)
    assert radio.keyed
    # Keyed half-duplex radio: its own squelch (e.g. TX bleeding into RX) is ignored.
    radio.talk = True
    run(engine, 5)
    assert tone_level(talker.recent_audio(5), 800) < 1e-4
    talker.talk = False
    run(engine, round(0.3 / TICK))
    assert radio.keyed  # hang time holds the transmitter
    run(engine, 2)
    assert not radio.keyed
    # Unkeyed, its squelch counts: now it is a talker and the other side hears it.
    run(engine, 3)
    assert tone_level(talker.recent_audio(2), 800) > 0.2
    # While it receives, talkgroup audio does not key it: a receiving radio cannot transmit.
    talker.talk = True
    run(engine, 10)
    assert not radio.keyed and all(f is None for f in radio.heard[-10:])
    kinds = [e.kind for e in events if e.port == "radio"]
    assert kinds[:2] == ["ptt_on", "ptt_off"]


def test_faulty_port_is_isolated_and_retried() -> None:
    a, b, bad = ScriptedPort("a", 500), ScriptedPort("b"), ScriptedPort("bad", 700)
    engine, events = site([a, b, bad])
    a.talk = bad.talk = True
    bad.fail_reads = 1
    run(engine, 10)
    assert engine.health["bad"].faults == 1
    assert tone_level(b.recent_audio(5), 500) > 0.2  # everyone else carries on
    assert tone_level(b.recent_audio(5), 700) < 1e-4  # bad is silenced while isolated
    run(engine, round(1.0 / TICK))  # first retry after one second
    assert tone_level(b.recent_audio(5), 700) > 0.2
    # A NaN frame and an out-of-range frame are counted and isolate the port again.
    bad.next_frame = __import__("numpy").full(320, float("nan"), "float32")
    run(engine, 3)
    assert engine.health["bad"].bad_frames == 1
    assert tone_level(b.recent_audio(2), 500) > 0.2
    assert [e.kind for e in events if e.port == "bad"].count("fault") == 2


def test_tick_hooks_run_around_the_ports_and_a_failing_one_is_contained() -> None:
    order: list[str] = []

    class Recording(ScriptedPort):
        def read(self):
            order.append("read")
            return super().read()

    port = Recording("a")
    engine, _ = site([port, ScriptedPort("b")])

    def broken() -> None:
        raise RuntimeError("bank decode failed")

    engine.before_tick += [lambda: order.append("before"), broken]
    engine.after_tick.append(lambda: order.append("after"))
    run(engine, 2)
    assert order == ["before", "read", "after"] * 2
    assert engine.tick_count == 2


def test_floor_holder_keeps_the_floor_when_a_port_joins() -> None:
    low, listener = ScriptedPort("low", 500), ScriptedPort("l")
    engine, events = site([low, listener], floor="single")
    low.talk = True
    run(engine, 5)
    joiner = ScriptedPort("joiner", 700)
    joiner.talk = True
    engine.attach(joiner, "tg")  # a call joins, asking for the floor at once
    run(engine, 10)
    heard = listener.recent_audio(5)
    assert tone_level(heard, 500) > 0.2 and tone_level(heard, 700) < 1e-4
    assert [e.port for e in events if e.kind == "floor_granted"] == ["low"]


def test_joining_and_leaving_ports_are_events_with_talkgroup_and_time() -> None:
    """Audit and MQTT learn of calls and consoles from these, not by polling the engine."""
    engine, events = site([ScriptedPort("radio", 500)])
    run(engine, 3)
    call = ScriptedPort("call")
    engine.attach(call, "tg")
    run(engine, 25)
    talking = ScriptedPort("console", 700)
    talking.talk = True
    engine.attach(talking, "tg")
    run(engine, 5)
    engine.detach(call)
    engine.detach(talking)
    engine.detach(call)  # a second detach is a no-op, not a second event
    moves = [(e.kind, e.port, e.talkgroup, e.group) for e in events if e.kind in ("joined", "left")]
    assert moves == [
        ("joined", "call", "tg", "tg"),
        ("joined", "console", "tg", "tg"),
        ("left", "call", "tg", "tg"),
        ("left", "console", "tg", "tg"),
    ]
    left = {e.port: e.seconds for e in events if e.kind == "left"}
    assert left["call"] == 30 * TICK and left["console"] == 5 * TICK
    assert all(p.name == "radio" for p in engine.ports) and not engine.attached


def test_out_of_range_frame_isolates_but_a_hot_one_is_only_clipped() -> None:
    import numpy as np

    src, listener = ScriptedPort("src", 500), ScriptedPort("l")
    engine, _ = site([src, listener])
    src.talk = True
    src.next_frame = np.full(320, 1.2, np.float32)  # a little hot: clipped to full scale
    run(engine, 1)
    assert engine.health["src"].bad_frames == 0 and listener.heard[-1].max() <= 1.0
    src.next_frame = np.full(320, 3.0, np.float32)  # int16 scale mistakes look like this
    run(engine, 1)
    assert engine.health["src"].bad_frames == 1 and "src" in engine.isolated


def test_courtesy_tone_follows_an_over_and_keys_the_listeners() -> None:
    talker, radio = ScriptedPort("talker", 500), ScriptedPort("radio", duplex="half")
    engine = Engine(TIMING)
    tg = TalkgroupConfig(members=["talker", "radio"], courtesy_tone=True)
    engine.configure([talker, radio], {"tg": tg}, {})
    talker.talk = True
    run(engine, 10)
    talker.talk = False
    run(engine, 10)
    beep = radio.recent_audio(10)
    assert tone_level(beep[:960], 800) > 0.05  # 800 Hz then 1200 Hz, 60 ms each
    assert tone_level(beep[960:1920], 1200) > 0.05
    assert tone_level(beep[:1920], 500) < 1e-3  # the talker's audio is over
    assert radio.keyed  # the beep went out on the air, then hang time


def test_talk_permit_tone_tells_a_phone_it_has_the_floor() -> None:
    phone, radio = ScriptedPort("phone", 500), ScriptedPort("radio", 900, duplex="half")
    engine = Engine(TIMING)
    tg = TalkgroupConfig(members=["phone", "radio"], floor="single", talk_permit_tone=True)
    engine.configure([phone, radio], {"tg": tg}, {})
    phone.talk = True
    run(engine, 30)
    heard = phone.recent_audio(30)
    assert tone_level(heard[:5120], 1000) > 0.05  # three beeps in the first 300 ms
    assert tone_level(heard[6400:], 1000) < 1e-3
    to_radio = radio.recent_audio(30)
    assert tone_level(to_radio, 500) > 0.2 and tone_level(to_radio, 1000) < 1e-3  # talker only


def test_no_tones_unless_configured() -> None:
    talker, other = ScriptedPort("talker", 500), ScriptedPort("other")
    engine, _ = site([talker, other])
    talker.talk = True
    run(engine, 10)
    talker.talk = False
    run(engine, 10)
    assert all(f is None for f in other.heard[-10:])


def test_every_key_up_is_released_in_the_events_on_stop_and_when_a_call_leaves() -> None:
    """The audit log's `transmit` record comes from ptt_off: a transmitter dropped by a stop
    or by its call leaving must report it too, or the log shows a PTT never released."""
    talker = ScriptedPort("talker", 500)
    radio = ScriptedPort("radio", 800)
    engine, events = site([talker, radio])
    call = ScriptedPort("call")
    engine.attach(call, "tg")
    talker.talk = True
    run(engine, 10)
    assert radio.keyed and call.keyed
    engine.detach(call)
    engine.unkey_all()
    offs = {e.port: e.seconds for e in events if e.kind == "ptt_off"}
    assert set(offs) == {"radio", "call"}
    assert offs["radio"] == offs["call"] == 10 * TICK
    engine.unkey_all()  # nothing keyed now: no second release
    assert sum(e.kind == "ptt_off" for e in events) == 2
