"""PTT keyers and COR detectors through their OS interfaces.

CM108: a regular file stands in for /dev/hidrawN (the keyer writes its 5-byte output
reports to it) and a FIFO for the fob's input reports. Serial: a real pty; Linux ptys
have no modem lines, so only the TIOCM* ioctls are faked (a fake of the OS call, not
of our code). GPIO: no gpiochip here, so gpiod's request object is faked likewise.
"""

from __future__ import annotations

import errno
import os
import pty
import struct
import sys
import termios
import threading
import time
import types

import numpy as np
import pytest
import serial.serialposix
from gateway.hardware import ptt as ptt_mod
from gateway.hardware import squelch as sq
from gateway.hardware.lines import Cm108, LineError

from tests.hardware.guarded import fake_env, rts, set_modem
from tests.hardware.jackradio import hid_keyed, hid_reports
from tests.waiting import wait_for


class FakeModem:
    """The TIOCM* ioctls of a serial port: RTS/DTR out, CTS/DSR/CD/RI in; can be unplugged."""

    def __init__(self, real_fcntl: types.ModuleType) -> None:
        self.real = real_fcntl
        self.bits = 0
        self.history: list[tuple[float, int]] = []
        self.unplugged = False

    def ioctl(self, fd, request, arg=0, *rest):
        if request in (termios.TIOCMBIS, termios.TIOCMBIC, termios.TIOCMGET, termios.TIOCMSET):
            if self.unplugged:
                raise OSError(errno.EIO, "Input/output error")
            if request == termios.TIOCMGET:
                return struct.pack("I", self.bits)
            (value,) = struct.unpack("I", arg)
            if request == termios.TIOCMBIS:
                self.bits |= value
            elif request == termios.TIOCMBIC:
                self.bits &= ~value
            else:
                self.bits = value
            self.history.append((time.monotonic(), self.bits))
            return arg
        return self.real.ioctl(fd, request, arg, *rest)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def has(self, bit: int) -> bool:
        return bool(self.bits & bit)


@pytest.fixture
def modem(monkeypatch):
    fake = FakeModem(serial.serialposix.fcntl)
    monkeypatch.setattr(serial.serialposix, "fcntl", fake)
    return fake


@pytest.fixture
def tty():
    master, slave = pty.openpty()
    yield os.ttyname(slave)
    os.close(master)
    os.close(slave)


def test_serial_rts_keyer_keys_and_never_raises_rts_on_open(modem, tty):
    keyer = ptt_mod.SerialKeyer(tty, "rts")
    keyer.open()
    assert not modem.has(termios.TIOCM_RTS)
    assert all(not bits & termios.TIOCM_RTS for _, bits in modem.history), "RTS rose on open"
    keyer.set(True)
    assert modem.has(termios.TIOCM_RTS) and not modem.has(termios.TIOCM_DTR)
    keyer.set(False)
    assert not modem.has(termios.TIOCM_RTS)
    keyer.close()


def test_serial_dtr_inverted_keyer_idles_high(modem, tty):
    keyer = ptt_mod.SerialKeyer(tty, "dtr", invert=True)
    keyer.open()
    assert modem.has(termios.TIOCM_DTR)  # inverted: idle is the line asserted
    keyer.set(True)
    assert not modem.has(termios.TIOCM_DTR)
    keyer.close()
    assert modem.has(termios.TIOCM_DTR), "close must leave the line unkeyed (high when inverted)"


def test_closing_an_inverted_serial_keyer_does_not_let_the_kernel_drop_its_line(modem):
    """HUPCL: the kernel lowers RTS and DTR at a tty's last close, which keys a radio wired
    inverted (idle = asserted) after the gateway, its guardian or `unkey` has gone."""
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[2] |= termios.HUPCL  # a serial port's default
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    try:
        keyer = ptt_mod.SerialKeyer(os.ttyname(slave), "rts", invert=True)
        keyer.open()
        keyer.close()
        assert not termios.tcgetattr(slave)[2] & termios.HUPCL
        plain = ptt_mod.SerialKeyer(os.ttyname(slave), "rts")
        plain.open()
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        plain.close()  # idle low: nothing to keep; the setting is left as it was
        assert termios.tcgetattr(slave)[2] & termios.HUPCL
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize(
    "line, bit",
    [
        ("cts", termios.TIOCM_CTS),
        ("dsr", termios.TIOCM_DSR),
        ("dcd", termios.TIOCM_CAR),
        ("ri", termios.TIOCM_RNG),
    ],
)
def test_serial_cor_reads_its_line(modem, tty, line, bit):
    cor = sq.SerialCor(tty, line)
    cor.open()
    assert cor.sample(None) is False
    modem.bits |= bit
    assert cor.sample(None) is True
    inverted = sq.SerialCor(tty, line, invert=True)
    inverted.open()  # shares the open port
    assert inverted.sample(None) is False
    inverted.close()
    cor.close()


def test_ptt_and_cor_share_one_serial_port(modem, tty):
    keyer = ptt_mod.SerialKeyer(tty, "rts")
    cor = sq.SerialCor(tty, "cts")
    keyer.open()
    cor.open()
    assert keyer.lines.port is cor.lines.port
    keyer.close()
    modem.bits |= termios.TIOCM_CTS
    assert cor.sample(None) is True, "closing the keyer closed the COR's port"
    cor.close()


def test_cor_opened_beside_a_keyed_ptt_in_another_process_leaves_rts_alone(modem, tty):
    """The PTT guardian holds RTS up on the same port (its own descriptor); the gateway's
    COR opening the port must neither drop it nor pulse it."""
    modem.bits |= termios.TIOCM_RTS | termios.TIOCM_DTR
    cor = sq.SerialCor(tty, "cts")
    cor.open()
    try:
        assert modem.has(termios.TIOCM_RTS) and modem.has(termios.TIOCM_DTR)
        assert all(bits & termios.TIOCM_RTS for _, bits in modem.history), "RTS dropped on open"
    finally:
        cor.close()


def test_cm108_keyer_writes_output_reports_to_hidraw(tmp_path):
    hid = tmp_path / "hidraw0"
    hid.touch()
    keyer = ptt_mod.Cm108Keyer(str(hid), gpio=3)
    keyer.open()
    keyer.set(True)
    keyer.set(False)
    keyer.close()
    assert hid_reports(hid) == [
        bytes([0, 0, 0, 4, 0]),
        bytes([0, 0, 4, 4, 0]),
        bytes([0, 0, 0, 4, 0]),
        bytes([0, 0, 0, 4, 0]),
    ]


def test_cm108_gpio_numbers_are_checked():
    with pytest.raises(ValueError, match="1..8"):
        ptt_mod.Cm108Keyer("/dev/hidraw0", gpio=9)


def test_cm108_cor_reads_the_fobs_input_reports(tmp_path):
    fifo = tmp_path / "hidraw1"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # keeps the FIFO open like a device
    cor = sq.Cm108Cor(str(fifo), "vol_dn")
    cor.open()
    assert cor.sample(None) is False
    os.write(writer, bytes([0x02, 0, 0, 0]))  # VOL_DN pressed
    assert cor.sample(None) is True
    assert cor.sample(None) is True, "the state holds between reports"
    os.write(writer, bytes([0x01, 0, 0, 0]) + bytes([0x00, 0, 0, 0]))  # VOL_UP, then released
    assert cor.sample(None) is False, "only the last report counts"
    cor.close()
    os.close(writer)


def test_gpio_keyer_through_gpiod(monkeypatch, tmp_path):
    chip = tmp_path / "gpiochip0"
    chip.touch()
    values: dict[int, object] = {}

    class Request:
        def set_value(self, line, value):
            values[line] = value

        def get_value(self, line):
            return values.get(line)

        def release(self):
            values["released"] = True

    value = types.SimpleNamespace(ACTIVE="active", INACTIVE="inactive")
    line_mod = types.SimpleNamespace(
        Direction=types.SimpleNamespace(OUTPUT="out", INPUT="in"), Value=value
    )
    gpiod = types.ModuleType("gpiod")
    gpiod.LineSettings = lambda **kw: kw
    gpiod.request_lines = lambda path, consumer, config: Request()
    gpiod.line = line_mod
    monkeypatch.setitem(sys.modules, "gpiod", gpiod)
    monkeypatch.setitem(sys.modules, "gpiod.line", line_mod)
    keyer = ptt_mod.GpioKeyer(str(chip), 17)
    keyer.open()
    assert values[17] == "inactive"
    keyer.set(True)
    assert values[17] == "active"
    keyer.close()
    assert values[17] == "inactive" and values["released"]


def test_vox_opens_at_its_threshold():
    vox = sq.Vox(-30.0)
    t = np.arange(320) / 16000
    assert vox.sample(0.05 * np.sin(2 * np.pi * 1000 * t)) is True  # about -29 dBFS
    assert vox.sample(0.03 * np.sin(2 * np.pi * 1000 * t)) is False  # about -33 dBFS
    assert vox.sample(None) is False


def test_ctcss_and_cor_combined():
    rate = 16000
    t = np.arange(rate * 2) / rate
    with_tone = 0.1 * np.sin(2 * np.pi * 100.0 * t) + 0.3 * np.sin(2 * np.pi * 1000 * t)
    other_tone = 0.1 * np.sin(2 * np.pi * 110.9 * t) + 0.3 * np.sin(2 * np.pi * 1000 * t)

    class Line(sq.Detector):
        state = True

        def sample(self, frame):
            return self.state

    line = Line()
    both = sq.Combined([line, sq.Ctcss(rate, 100.0)], "and")
    frames = with_tone.astype(np.float32).reshape(-1, 320)
    results = [both.sample(f) for f in frames]
    assert results[-1] is True and results[0] is False  # the decoder needs its window first
    line.state = False
    assert both.sample(frames[-1]) is False
    line.state = True
    wrong = sq.Combined([line, sq.Ctcss(rate, 100.0)], "and")
    assert not any(wrong.sample(f) for f in other_tone.astype(np.float32).reshape(-1, 320))


def test_subaudible_filter_takes_out_ctcss_and_keeps_voice():
    from gateway.hardware.ctcss import SubAudibleFilter

    rate = 16000
    t = np.arange(rate) / rate
    filt = SubAudibleFilter(rate)
    tone = np.sin(2 * np.pi * 100 * t).astype(np.float32)
    voice = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    out_tone = np.concatenate([filt.process(f) for f in tone.reshape(-1, 320)])
    filt = SubAudibleFilter(rate)
    out_voice = np.concatenate([filt.process(f) for f in voice.reshape(-1, 320)])
    assert np.std(out_tone[rate // 2 :]) < 0.01 * np.std(tone)  # ≥ 40 dB down
    assert abs(np.std(out_voice[rate // 2 :]) / np.std(voice) - 1) < 0.05


def test_squelch_open_delay_and_hang():
    s = sq.Squelch(0.02, open_delay=0.06, hang=0.1)
    pattern = [True] * 2 + [False] + [True] * 10 + [False] * 10
    states = [s.update(x) for x in pattern]
    assert states[:3] == [False, False, False], "a 40 ms kerchunk must not open"
    assert states[3:6] == [False, False, False] and states[6] is True  # open after 60 ms
    assert all(states[6:13]) and all(states[13:18]) and not any(states[18:])  # 100 ms hang


def feeding(controller, stop):
    """The engine's ticks: the heartbeat that keeps a wanted line keyed."""
    while not stop.is_set():
        controller.fed()
        time.sleep(0.02)


def test_ptt_controller_transmit_tot_runs_in_the_guardian(tmp_path):
    hid = tmp_path / "hidraw0"
    hid.touch()
    controller = ptt_mod.PttController(ptt_mod.Cm108Keyer(str(hid)), "r", tot=0.3)
    controller.open()
    stop = threading.Event()
    ticks = threading.Thread(target=feeding, args=(controller, stop))
    try:
        controller.key(True)
        assert hid_keyed(hid) is True
        start = time.monotonic()
        ticks.start()
        # (A feeding thread starved past the heartbeat timeout on a loaded machine also
        # drops the line for a moment — counted as a watchdog trip, tested on its own
        # below — and the engine keys it again: the TOT still trips once, in the guardian.)
        wait_for(lambda: controller.tot_tripped, 5, "the guardian to report the TOT")
        assert hid_keyed(hid) is False
        assert time.monotonic() - start > 0.28
        assert controller.counts["tot_trips"] == 1
        controller.key(True)  # the engine still wants it: stays down until a new over
        assert hid_keyed(hid) is False
        controller.key(False)
        controller.key(True)
        assert hid_keyed(hid) is True
    finally:
        stop.set()
        if ticks.is_alive():
            ticks.join()
        controller.close()
    assert hid_keyed(hid) is False


def test_ptt_guardian_drops_a_transmitter_whose_heartbeat_stops(tmp_path):
    """Nobody feeds the transmitter (the engine hung): the guardian drops it, and keys it
    again when the engine asks again."""
    hid = tmp_path / "hidraw0"
    hid.touch()
    controller = ptt_mod.PttController(ptt_mod.Cm108Keyer(str(hid)), "r", tot=0)
    controller.open()
    try:
        controller.key(True)
        assert hid_keyed(hid) is True
        wait_for(lambda: hid_keyed(hid) is False, 5, "the heartbeat timeout")
        wait_for(lambda: controller.counts["watchdog_trips"] == 1, 2, "the trip reported")
        assert not controller.keyed
        controller.fed()  # the engine is back and still wants to transmit
        wait_for(lambda: hid_keyed(hid) is True, 2, "PTT to key again")
    finally:
        controller.close()
    assert hid_keyed(hid) is False


def test_unplugged_serial_ptt_is_marked_down_and_resumes(tmp_path, tty):
    modem = tmp_path / "modem.json"
    guardian = ptt_mod.GuardianProcess(env=fake_env(modem))
    controller = ptt_mod.PttController(
        ptt_mod.SerialKeyer(tty, "rts"), "r", tot=0, guardian=guardian
    )
    controller.open()
    try:
        controller.key(True)
        assert rts(modem)
        set_modem(modem, unplugged=True)
        controller.key(False)
        controller.key(True)  # fails on the dead device
        wait_for(lambda: not controller.device_up, 2, "the PTT to be marked down")
        assert controller.counts["device_errors"] >= 1
        set_modem(modem, unplugged=False, bits=0)  # a replugged adapter: its lines down
        wait_for(lambda: controller.device_up, 5, "the serial PTT to be reopened")
        controller.fed()  # the engine's next tick
        wait_for(lambda: rts(modem), 2, "PTT to resume (still wanted)")
    finally:
        controller.close()
        guardian.close()
    assert not rts(modem)


def test_missing_hidraw_is_a_clear_error(tmp_path):
    with pytest.raises(LineError, match="no such device"):
        Cm108(str(tmp_path / "hidraw9")).open()


class Fob:
    """A pty standing in for a CM108 fob's /dev/hidrawN: the keyer writes its output reports
    to the slave (raw mode: bytes pass unchanged) and the test reads them from the master.
    Unplugging closes the master, so writes fail with EIO as on a vanished USB device, and
    removes the node; plugging in again makes a new pty behind the same name."""

    def __init__(self, link) -> None:
        self.link = link
        self.master = self.slave = -1
        self.last: bool | None = None
        self.plug()

    def plug(self) -> None:
        import tty

        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        os.symlink(os.ttyname(self.slave), self.link)

    def unplug(self) -> None:
        os.unlink(self.link)
        os.close(self.master)
        os.close(self.slave)

    def keyed(self, gpio: int = 3) -> bool | None:
        """PTT state from the last output report the fob received (None: none yet)."""
        data = b""
        while True:
            try:
                chunk = os.read(self.master, 1024)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        if len(data) >= 5:
            self.last = bool(data[len(data) - len(data) % 5 - 5 + 2] & (1 << (gpio - 1)))
        return self.last


def test_unplugged_cm108_ptt_is_marked_down_and_resumes_when_plugged_back(tmp_path):
    fob = Fob(tmp_path / "hidraw_b")
    controller = ptt_mod.PttController(ptt_mod.Cm108Keyer(str(fob.link), 3), "r", tot=0)
    controller.open()
    try:
        controller.key(True)
        assert fob.keyed() is True
        fob.unplug()  # pulled out while transmitting
        controller.key(False)  # the unkey report fails on the dead device (EIO)
        controller.key(True)  # the engine still wants to transmit
        wait_for(lambda: not controller.device_up, 2, "the PTT to be marked down")
        assert controller.counts["device_errors"] >= 1
        assert not controller.keyed
        fob.plug()  # a new device node behind the same name
        wait_for(lambda: controller.device_up, 5, "the fob's PTT to be reopened")
        controller.fed()  # the engine's next tick
        wait_for(lambda: fob.keyed() is True, 2, "PTT to key again (still wanted)")
    finally:
        controller.close()
    assert fob.keyed() is False  # closing unkeys the replugged fob
    fob.unplug()


def test_a_line_that_cannot_be_unkeyed_is_reported_loudly_until_it_is(tmp_path, capfd):
    """The fob vanishes while keyed: the unkey cannot reach it. That is an ERROR in the log
    and ``ptt_stuck`` in the port's stats (a metric) until the device is back and unkeyed."""
    fob = Fob(tmp_path / "hidraw_b")
    guardian = ptt_mod.GuardianProcess()  # its own, so its log is this test's stderr
    controller = ptt_mod.PttController(
        ptt_mod.Cm108Keyer(str(fob.link), 3), "radio_b", tot=0, guardian=guardian
    )
    controller.open()
    try:
        controller.key(True)
        assert fob.keyed() is True
        fob.unplug()
        controller.key(False)  # the unkey report fails on the dead device (EIO)
        wait_for(lambda: controller.stats()["ptt_stuck"] == 1.0, 5, "the stuck line reported")
        wait_for(lambda: "may be stuck keyed" in capfd.readouterr().err, 5, "an ERROR logged")
        fob.plug()
        wait_for(lambda: controller.device_up, 5, "the fob to be reopened")
        wait_for(lambda: controller.stats()["ptt_stuck"] == 0.0, 5, "the stuck state cleared")
        assert fob.keyed() is False
    finally:
        controller.close()
        guardian.close()
        fob.unplug()
