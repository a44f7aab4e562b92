"""N-1 mixing checked by content: each listener hears the others, never itself."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TIMING, ScriptedPort, db, tone_level

from gateway.config import PatchConfig, TalkgroupConfig
from gateway.engine import Engine


def site(ports, groups: dict[str, list[str]], patches=None, floor="mix") -> Engine:
    engine = Engine(TIMING)
    tgs = {n: TalkgroupConfig(members=m, floor=floor) for n, m in groups.items()}
    engine.configure(ports, tgs, patches or {})
    return engine


def run(engine: Engine, ticks: int) -> None:
    for _ in range(ticks):
        engine.tick()


def test_each_listener_hears_the_others_and_not_itself() -> None:
    a, b, c = ScriptedPort("a", 500), ScriptedPort("b", 700), ScriptedPort("c", 900)
    quiet = ScriptedPort("d")
    engine = site([a, b, c, quiet], {"tg": ["a", "b", "c", "d"]})
    for p in (a, b, c):
        p.talk = True
    run(engine, 25)
    heard = {p.name: p.recent_audio(20) for p in (a, b, c, quiet)}
    for listener, own in (("a", 500), ("b", 700), ("c", 900)):
        levels = {hz: tone_level(heard[listener], hz) for hz in (500, 700, 900)}
        assert levels[own] < 1e-4, f"{listener} hears itself"
        for hz, level in levels.items():
            if hz != own:
                assert db(level) == pytest.approx(db(0.25), abs=0.5)
    assert all(
        db(tone_level(heard["d"], hz)) == pytest.approx(db(0.25), abs=0.5) for hz in (500, 700, 900)
    )


def test_talkgroups_do_not_leak_and_a_patch_joins_them_live() -> None:
    a, b = ScriptedPort("a", 500), ScriptedPort("b")
    c, d = ScriptedPort("c", 900), ScriptedPort("d")
    patches = {"p": PatchConfig(talkgroups=["one", "two"], enabled=False)}
    engine = site([a, b, c, d], {"one": ["a", "b"], "two": ["c", "d"]}, patches)
    a.talk = c.talk = True
    run(engine, 20)
    assert tone_level(b.recent_audio(10), 500) > 0.2 and tone_level(b.recent_audio(10), 900) < 1e-4
    assert tone_level(d.recent_audio(10), 900) > 0.2 and tone_level(d.recent_audio(10), 500) < 1e-4
    engine.set_patch("p", True)
    run(engine, 20)
    for listener in (b, d):
        audio = listener.recent_audio(10)
        assert tone_level(audio, 500) > 0.2 and tone_level(audio, 900) > 0.2
    assert tone_level(a.recent_audio(10), 900) > 0.2  # a talker hears the other side
    engine.set_patch("p", False)
    run(engine, 20)
    assert tone_level(b.recent_audio(10), 900) < 1e-4


def test_port_gains_apply_in_db() -> None:
    a = ScriptedPort("a", 600, rx_gain_db=-6.0)
    b = ScriptedPort("b", tx_gain_db=-6.0)
    engine = site([a, b], {"tg": ["a", "b"]})
    a.talk = True
    run(engine, 20)
    assert db(tone_level(b.recent_audio(10), 600)) == pytest.approx(db(0.25) - 12, abs=0.3)


def test_limiter_never_wraps_and_keeps_loud_sums_loud() -> None:
    talkers = [ScriptedPort(f"t{i}", 300 + 170 * i, level=0.8) for i in range(6)]
    listener = ScriptedPort("l")
    engine = site([*talkers, listener], {"tg": [p.name for p in [*talkers, listener]]})
    for p in talkers:
        p.talk = True
    run(engine, 100)
    audio = listener.recent_audio(90)
    assert np.abs(audio).max() <= 1.0
    # No wrap-around: the output follows the sign of the true sum wherever it is loud.
    engine_free_sum = sum(
        0.8 * np.sin(2 * np.pi * (300 + 170 * i) * (np.arange(len(audio)) + 10 * 320) / 16000)
        for i in range(6)
    )
    loud = np.abs(engine_free_sum) > 0.5
    assert np.mean(np.sign(audio[loud]) == np.sign(engine_free_sum[loud])) > 0.99
    assert db(np.sqrt(np.mean(audio**2))) > -12  # limited, not muted


def test_nobody_hears_anything_when_nobody_talks() -> None:
    a, b = ScriptedPort("a"), ScriptedPort("b")
    engine = site([a, b], {"tg": ["a", "b"]})
    run(engine, 10)
    assert all(f is None for f in a.heard + b.heard)
    assert not any(a.key_calls + b.key_calls)


@pytest.mark.parametrize("ports,groups,talking", [(5, 2, 0.6), (60, 7, 0.5), (400, 30, 0.9)])
def test_vectorised_mix_matches_per_port_reference(ports: int, groups: int, talking: float) -> None:
    """Both the small-site (dense) and large-site (sparse) paths against plain loops."""
    from gateway.mixer import Mixer

    rng = np.random.default_rng(ports)
    frames = (rng.standard_normal((ports, 320)) * 0.01).astype(np.float32)
    group_of = rng.integers(0, groups + 1, ports)  # == groups: in no group
    gains = rng.uniform(0.5, 2, ports)
    weights = np.where(rng.random(ports) < talking, gains, 0).astype(np.float32)
    out_gain = rng.uniform(0.5, 1.5, ports).astype(np.float32)
    mixer = Mixer(320, 16000)
    mixer.resize(ports)
    result = mixer.mix(frames, weights, group_of, groups, out_gain)
    for i in range(ports):
        others = [j for j in range(ports) if j != i and group_of[j] == group_of[i] < groups]
        expected = sum((frames[j] * weights[j] for j in others if weights[j]), np.zeros(320))
        heard = any(weights[j] for j in others)
        assert result.audible[i] == heard
        if heard:
            np.testing.assert_allclose(result.out[i], expected * out_gain[i], atol=1e-5)


def test_level_meters_read_rms_dbfs_and_fall_back_slowly() -> None:
    a, b = ScriptedPort("a", 1000, level=0.25), ScriptedPort("b")
    engine = site([a, b], {"tg": ["a", "b"]})
    a.talk = True
    run(engine, 10)
    rms_db = db(0.25 / np.sqrt(2))
    assert engine.rx_dbfs[0] == pytest.approx(rms_db, abs=0.1)
    assert engine.tx_dbfs[1] == pytest.approx(rms_db, abs=0.1)
    a.talk = False
    run(engine, 25)  # half a second: the meter has fallen 10 dB, not to nothing
    assert engine.rx_dbfs[0] == pytest.approx(rms_db - 10, abs=0.5)


def test_a_link_listener_hears_no_link_talker_only_its_own_sides_audio() -> None:
    """Cross-border links: a link carries only audio that originated on its own side, so a
    site between two links never forwards one link's audio to the other (no loops)."""

    class LinkPort(ScriptedPort):
        kind = "link"

    radio, phone = ScriptedPort("radio", 500), ScriptedPort("phone", 700)
    to_us, to_mx = LinkPort("link-us", 900), LinkPort("link-mx", 1100)
    engine = site([radio, phone, to_us, to_mx], {"tg": ["radio", "phone", "link-us", "link-mx"]})
    for p in (radio, phone, to_us, to_mx):
        p.talk = True
    run(engine, 25)
    for link, other in ((to_us, 1100), (to_mx, 900)):
        heard = link.recent_audio(20)
        assert tone_level(heard, other) < 1e-4, f"{link.name} hears the other link"
        assert tone_level(heard, 900 if link is to_us else 1100) < 1e-4, "hears itself"
        for hz in (500, 700):  # the local side, as loud as any listener hears it
            assert db(tone_level(heard, hz)) == pytest.approx(db(0.25), abs=0.5)
    heard = radio.recent_audio(20)  # local ports hear both links and each other
    for hz in (700, 900, 1100):
        assert db(tone_level(heard, hz)) == pytest.approx(db(0.25), abs=0.5)
    # Only link talkers: the links hear nothing at all (and are not keyed for it).
    radio.talk = phone.talk = False
    run(engine, 60)  # past the hang time
    assert tone_level(to_us.recent_audio(20), 1100) < 1e-4
    assert not engine.keying.keyed[engine.ports.index(to_us)]
