"""Ports in a bank hear and are heard exactly like ports read and written one by one."""

from __future__ import annotations

import numpy as np
from helpers import RATE, TIMING, N, ScriptedPort, tone_level

from gateway.config import PortConfig, TalkgroupConfig
from gateway.engine import Engine
from gateway.ports import Port, PortBank


class ToneBank(PortBank):
    """A bank of callers: row k plays tone_hz[k] while talk[k]; keeps what each heard."""

    def __init__(self, tones: list[float]) -> None:
        self.tones = np.array(tones, np.float64)
        self.talk = np.zeros(len(tones), bool)
        self.sample = 0
        self.heard: list[np.ndarray] = []  # (ports, N) per tick, zero where not audible
        self.audible: list[np.ndarray] = []
        self.fail_next_read = False
        self.lists: list[list] = []  # the ports list of each read: one object per layout
        self.ports = [BankPort(f"caller{k}", self, k) for k in range(len(tones))]

    def read_frames(self, ports, frames, rows):
        if self.fail_next_read:
            self.fail_next_read = False
            raise OSError("socket gone")
        self.lists.append(ports)
        t = (self.sample + np.arange(N)) / RATE
        self.sample += N
        index = [p.index for p in ports]
        tones = 0.25 * np.sin(2 * np.pi * self.tones[index, None] * t)
        frames[rows] = np.where(self.talk[index, None], tones, 0.0)
        return self.talk[index].copy(), self.talk[index].copy()

    def write_frames(self, ports, out, rows, audible):
        heard = np.zeros((len(self.ports), N), np.float32)
        index = [p.index for p in ports]
        heard[index] = np.where(audible[:, None], out[rows], 0.0)
        self.heard.append(heard)

    def recent(self, k: int, ticks: int) -> np.ndarray:
        return np.concatenate([h[k] for h in self.heard[-ticks:]])


class BankPort(Port):
    kind = "bank_caller"

    def __init__(self, name: str, bank: ToneBank, index: int) -> None:
        super().__init__(name, PortConfig(kind="bank_caller"), TIMING)
        self.port_bank = bank
        self.index = index

    def read(self):  # the engine must never call these for a bank's ports
        raise AssertionError("read() called on a bank port")

    def write(self, frame):
        raise AssertionError("write() called on a bank port")


def site(bank: ToneBank, solo: list[Port], floor: str = "mix") -> Engine:
    engine = Engine(TIMING)
    members = [p.name for p in solo]
    engine.configure(list(solo), {"tg": TalkgroupConfig(members=members, floor=floor)}, {})
    for port in bank.ports:
        engine.attach(port, "tg")
    return engine


def test_bank_ports_get_n_minus_1_and_are_heard_by_solo_ports() -> None:
    radio = ScriptedPort("radio", 500)
    bank = ToneBank([700, 900, 1100])
    engine = site(bank, [radio])
    radio.talk = True
    bank.talk[:] = [True, True, False]
    for _ in range(10):
        engine.tick()
    heard_radio = radio.recent_audio(5)
    assert tone_level(heard_radio, 700) > 0.2 and tone_level(heard_radio, 900) > 0.2
    assert tone_level(heard_radio, 1100) < 1e-4 and tone_level(heard_radio, 500) < 1e-4
    first, listener = bank.recent(0, 5), bank.recent(2, 5)
    assert tone_level(first, 700) < 1e-4, "a caller hears itself"
    assert tone_level(first, 500) > 0.2 and tone_level(first, 900) > 0.2
    assert all(tone_level(listener, hz) > 0.2 for hz in (500, 700, 900))
    # Banks may cache per layout on the list's identity: same list until the layout changes.
    assert all(seen is bank.lists[0] for seen in bank.lists)
    engine.detach(bank.ports[2])
    engine.tick()
    assert bank.lists[-1] is not bank.lists[0] and len(bank.lists[-1]) == 2


def test_bank_failure_isolates_its_ports_and_the_site_carries_on() -> None:
    radio, other = ScriptedPort("radio", 500), ScriptedPort("other")
    bank = ToneBank([700, 900])
    engine = site(bank, [radio, other])
    radio.talk = True
    bank.talk[:] = True
    engine.tick()
    bank.fail_next_read = True
    for _ in range(5):
        engine.tick()
    assert {"caller0", "caller1"} <= set(engine.isolated)
    heard = other.recent_audio(4)
    assert tone_level(heard, 500) > 0.2 and tone_level(heard, 700) < 1e-4
    assert not bank.heard[-1].any(), "an isolated bank port was sent audio"


def test_busy_tone_reaches_a_bank_port_denied_the_floor() -> None:
    radio = ScriptedPort("radio", 500, duplex="half")
    bank = ToneBank([700])
    engine = site(bank, [radio], floor="single")
    radio.talk = True
    engine.tick()
    bank.talk[:] = True  # the caller asks while the radio holds the floor
    for _ in range(25):
        engine.tick()
    heard = bank.recent(0, 25)
    assert tone_level(heard, 480) > 0.01 and tone_level(heard, 620) > 0.01
    assert tone_level(heard, 500) < tone_level(heard, 480)
