"""A call's playout follows the media clock's schedule, even when a tick wakes late.

Each tick a leg's jitter buffer plays what has surely arrived by the tick's ideal
time. When that time was guessed from the first tick the bank saw — late by tens of
milliseconds on a machine still starting up — every later tick looked for audio
that had not arrived yet: each packet came "late", was dropped, and the call stayed
silent until something moved the guess (the two-site demo once carried nothing
across its link for a whole over). The bank now takes the clock's own deadline.

A real media clock drives a real leg bank on a real socket; a peer thread sends a
500 Hz µ-law tone on its own 20 ms schedule. The first tick is held up 45 ms (a
late wake-up); the test listens to the second half of three seconds.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import numpy as np
from gateway.codecs.g711 import ulaw_encode

from gateway.clock import MediaClock
from gateway.sip.bank import LegBank
from gateway.sip.legmedia import LegMedia

FRAME_S = 0.02
TONE_HZ = 500.0
TONE_DBFS = -20.0 - 3.01  # a sine of amplitude 0.1
SECONDS = 3.0
FIRST_TICK_LATE = 0.045


def _sender(peer: socket.socket, to: tuple[str, int], stop: threading.Event) -> None:
    t = np.arange(160) / 8000
    header = struct.Struct("!BBHII")
    start = time.monotonic()
    k = 0
    while not stop.is_set():
        phase = 2 * np.pi * TONE_HZ * (t + k * 0.02)
        payload = ulaw_encode((0.1 * 32767 * np.sin(phase)).astype(np.int16)).tobytes()
        peer.sendto(header.pack(0x80, 0, k & 0xFFFF, k * 160, 0x1234) + payload, to)
        k += 1
        time.sleep(max(0.0, start + k * 0.02 - time.monotonic()))


def test_a_late_first_tick_does_not_leave_the_playout_point_ahead_of_the_audio():
    frames: list[np.ndarray] = []
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    stop = threading.Event()

    async def run() -> LegBank:
        clock = MediaClock(FRAME_S, lambda: None)
        bank = LegBank(16000, 320, FRAME_S, capacity=2, late_by=clock.late_by)
        row = bank.add(LegMedia(payload_type=0, dtmf_type=101, remote=peer.getsockname()))
        sender = threading.Thread(target=_sender, args=(peer, ("127.0.0.1", bank.port), stop))
        sender.start()

        def tick() -> None:
            if clock.ticks == 0:
                time.sleep(FIRST_TICK_LATE)  # the first wake-up of a busy machine
            bank.receive()
            frames.append(bank.table.rx[row].copy())
            if clock.ticks * FRAME_S >= SECONDS:
                clock.stop()

        clock.on_tick = tick
        try:
            await clock.run()
        finally:
            stop.set()
            sender.join()
        bank.row_of = row  # type: ignore[attr-defined]
        return bank

    bank = asyncio.run(run())
    try:
        row = bank.row_of  # type: ignore[attr-defined]
        tail = np.stack(frames[len(frames) // 2 :])
        levels = 20 * np.log10(np.maximum(np.sqrt((tail**2).mean(axis=1)), 1e-9))
        carried = np.abs(levels - TONE_DBFS) < 3.0
        audio = tail.reshape(-1)
        spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
        peak_hz = np.argmax(spectrum) * 16000 / len(audio)
        late = int(bank.jitter.packets_late[row])
        print(
            f"{carried.mean():.0%} of frames carry the tone; {late} packets late; "
            f"peak {peak_hz:.0f} Hz"
        )
        assert carried.mean() >= 0.8, f"the call went silent: levels {np.round(levels)}"
        assert abs(peak_hz - TONE_HZ) < 10
        assert late <= len(frames) // 10, f"{late} of {len(frames)} packets came too late"
    finally:
        bank.close()
        peer.close()
