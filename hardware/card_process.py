"""A sound card's stream in a process of its own.

PortAudio calls back once per period (5.3 ms at 256 frames, 48 kHz) on the audio
server's realtime thread, and a Python callback needs its process's GIL. In the
gateway's process the GIL is busy with the tick, calls and consoles, so the callback
waited, came late, and the server dropped cycles (xruns). Here each card's stream
runs in a small process whose only other thread sleeps on a pipe: the callback gets
the GIL at once. It only copies: capture into one :class:`~.ring.SharedRing`,
playback out of another. Rate conversion, drift control, gains and squelch stay in
the gateway (``soundcard``), on the tick.

A card that vanishes is simple to handle this way. PortAudio 19.6's JACK host waits
ten minutes for a stream whose server died, and aborts the process if terminated
under it; a stale device list needs ``Pa_Terminate`` to refresh, which would stop
every other card's stream. Instead the card's process is killed (the audio server
drops a dead client by itself) and a fresh one, with a fresh PortAudio and device
list, tries again. No other card notices.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import signal
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from .devices import DeviceNotFound, find_card, sound_cards
from .ring import SharedRing

RING_SAMPLES = 1 << 18  # 5.4 s at 48 kHz, 1.4 s at 192 kHz: room for any stall worth riding
START_TIMEOUT_S = 20.0  # a new Python process, numpy and PortAudio, on a loaded machine
CLOSE_TIMEOUT_S = 2.0  # a stream that takes longer to close is stuck: the process is killed

# The callback's counters (int64), shared with the tick.
(XRUNS, TX_UNDERRUNS, RX_DROPPED, WINDOW, TX_LOW, TX_LOW_WINDOW, FINISHED, CALLBACKS,
 FRAMES) = range(9)
_COUNTERS = 9
_STATUS_BYTES = _COUNTERS * 8 + 8  # the counters, then the last callback's time (float64)


@dataclass(frozen=True)
class OpenRequest:
    """Everything the card's process needs to find and open its device."""

    device: str | int  # index, or a piece of the name
    host_api: str | None
    input_channels: int
    output_channels: int
    input_channel: int  # 0-based
    output_channel: int
    sample_rate: int | None  # None: the card's default
    blocksize: int
    latency: float | str
    client_name: str  # the JACK client's name (ignored by other host APIs)


@dataclass(frozen=True)
class Opened:
    rate: int
    card: str  # the device's line, as `borderlink devices` shows it


class CardBlock:
    """The shared memory of one card: status, capture ring, playback ring."""

    def __init__(self, name: str | None = None) -> None:
        size = _STATUS_BYTES + 2 * SharedRing.nbytes(RING_SAMPLES)
        if name is None:
            self.shm = shared_memory.SharedMemory(create=True, size=size)
        else:
            self.shm = shared_memory.SharedMemory(name=name)
        buf = self.shm.buf
        self.status = np.ndarray(_COUNTERS, np.int64, buf)
        # time.monotonic() of the last callback
        self.clock = np.ndarray(1, np.float64, buf, _COUNTERS * 8)
        self.rx = SharedRing(buf, RING_SAMPLES, _STATUS_BYTES)
        self.tx = SharedRing(buf, RING_SAMPLES, _STATUS_BYTES + SharedRing.nbytes(RING_SAMPLES))
        self.owner = name is None
        if self.owner:
            self.rx.buf.fill(0.0)  # every page mapped now, not by a page fault in a callback
            self.tx.buf.fill(0.0)

    @property
    def name(self) -> str:
        return self.shm.name

    def reset(self) -> None:
        """Fresh counters and empty rings; only while no process streams into it."""
        self.status[:] = 0
        self.clock[0] = time.monotonic()
        self.rx.reset()
        self.tx.reset()

    @property
    def closed(self) -> bool:
        return not hasattr(self, "status")

    def close(self) -> None:
        if self.closed:
            return
        del self.status, self.clock, self.rx, self.tx  # views first, or the block cannot close
        self.shm.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()


class StreamCallback:
    """The PortAudio callback: capture → ring, ring → playback, and the counts the tick needs.

    A playback underrun is counted once per run dry (not again until it has played a
    whole period again); the least playback level over the tick's window is kept for
    its drift control.
    """

    def __init__(self, block: CardBlock, input_channel: int, output_channel: int) -> None:
        self.block, self.input_channel, self.output_channel = block, input_channel, output_channel
        self.serving = False
        self.window = -1
        self.low = 0
        self.out = np.zeros(0, np.float32)

    def __call__(self, indata: np.ndarray, outdata: np.ndarray, frames: int, _t: Any,
                 status: Any) -> None:  # fmt: skip
        s, block = self.block.status, self.block
        block.clock[0] = time.monotonic()
        s[CALLBACKS] += 1
        s[FRAMES] = frames
        if status:
            s[XRUNS] += 1
        s[RX_DROPPED] += block.rx.push(indata[:, self.input_channel])
        if len(self.out) != frames:
            self.out = np.zeros(frames, np.float32)
        got = block.tx.pop_into(self.out)
        if got < frames:
            self.out[got:] = 0.0
            if self.serving:
                s[TX_UNDERRUNS] += 1
                self.serving = False
        else:
            self.serving = True
            level = block.tx.level
            window = int(s[WINDOW])
            self.low = level if window != self.window else min(self.low, level)
            self.window = window
            s[TX_LOW] = self.low
            s[TX_LOW_WINDOW] = window
        outdata.fill(0.0)
        outdata[:, self.output_channel] = self.out


class CardProcess:
    """The process that streams one card: started, asked to stop, or killed."""

    def __init__(self, block: CardBlock) -> None:
        self.block = block
        self.process: Any = None
        self.pipe: Connection | None = None

    def start(self, request: OpenRequest, timeout: float = START_TIMEOUT_S) -> Opened:
        """Open the card in a new process; raises ``DeviceNotFound`` or ``OSError`` naming why."""
        self.stop()
        self.block.reset()
        ctx = multiprocessing.get_context("spawn")  # never fork the gateway's threads
        self.pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(request, self.block.name, child),
                                   name=f"card {request.client_name}", daemon=True)  # fmt: skip
        self.process.start()
        child.close()
        try:
            answer = self.pipe.recv() if self.pipe.poll(timeout) else ("timeout", "")
        except EOFError:
            answer = ("died", "")
        kind, detail = answer[0], answer[1]
        if kind == "open":
            return Opened(*answer[1:])
        self.kill()
        if kind == "not_found":
            raise DeviceNotFound(detail)
        if kind == "timeout":
            raise OSError(f"the card's process did not answer within {timeout:.0f} s")
        if kind == "died":
            raise OSError("the card's process died while opening the device")
        raise OSError(detail)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def stop(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Close the stream and end the process; killed if it does not end in ``timeout``."""
        if self.process is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.pipe.send("close")
        self.process.join(timeout)
        self.kill()

    def kill(self) -> None:
        """End the process now: a stream stuck in PortAudio is never touched again."""
        if self.process is None:
            return
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.process.close()
        self.process = None
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None


# --- the card's process ---------------------------------------------------------------


def _serve(request: OpenRequest, block_name: str, pipe: Connection) -> None:
    # Ctrl-C reaches the whole process group: the gateway stops its cards in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A full cyclic-GC pass walks every object the imports made (milliseconds) and would
    # run inside a callback; the callback makes no cycles, so reference counting is enough.
    gc.disable()
    block = CardBlock(block_name)
    try:
        stream = _open(request, block, pipe)
    except Exception as exc:  # the gateway gets the reason, not a silent death
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    if stream is None:
        return
    with contextlib.suppress(EOFError):  # EOF: the gateway is gone
        pipe.recv()  # "close"
    stream.abort(ignore_errors=True)
    stream.close(ignore_errors=True)


def _open(request: OpenRequest, block: CardBlock, pipe: Connection) -> Any:
    import sounddevice as sd

    _name_jack_client(sd, request.client_name)
    try:
        card = find_card(request.device, request.host_api, request.input_channels,
                         request.output_channels, sound_cards())  # fmt: skip
    except DeviceNotFound as exc:
        pipe.send(("not_found", str(exc)))
        return None
    rate = request.sample_rate or int(card.default_rate)

    def finished() -> None:
        block.status[FINISHED] = 1

    try:
        stream = sd.Stream(
            device=(card.index, card.index),
            samplerate=rate,
            channels=(request.input_channels, request.output_channels),
            dtype="float32",
            blocksize=request.blocksize,
            latency=request.latency,
            callback=StreamCallback(block, request.input_channel, request.output_channel),
            finished_callback=finished,
        )
        stream.start()
    except sd.PortAudioError as exc:
        pipe.send(("cannot_open", f"sound card {card.index} ({card.name}): cannot open: "
                   f"{explain(exc, request, rate)}"))  # fmt: skip
        return None
    pipe.send(("open", rate, card.line().strip()))
    return stream


_CLIENT_NAME: list[ctypes.Array[ctypes.c_char]] = []  # PortAudio keeps the pointer


def _name_jack_client(sd: Any, name: str) -> None:
    """Name this process's JACK client (PortAudio reads it when initialised)."""
    if not name:
        return
    while sd._initialized:
        sd._terminate()
    buffer = ctypes.create_string_buffer(name.encode()[:60])
    _CLIENT_NAME.append(buffer)
    with contextlib.suppress(AttributeError, OSError):  # a PortAudio built without JACK
        ctypes.CDLL(sd._libname).PaJack_SetClientName(buffer)
    sd._initialize()


def explain(exc: Exception, request: OpenRequest, rate: int) -> str:
    """PortAudio's error, in the words an installer can act on."""
    text = str(exc)
    if "-9997" in text or "Invalid sample rate" in text:
        return (f"{rate} Hz is not a rate this device runs at (with JACK the rate is "
                f"the server's); set sample_rate to one it supports")  # fmt: skip
    if "-9985" in text or "busy" in text.lower() or "unavailable" in text.lower():
        return "the device is busy (another program has it open); close it or pick another card"
    if "-9998" in text or "Invalid number of channels" in text:
        return (f"the device has fewer channels than asked for "
                f"(in {request.input_channels}, out {request.output_channels})")  # fmt: skip
    return text


def jack_client_name(port: str) -> str:
    """The JACK client a radio port's card shows as: ``borderlink-<port>``."""
    return f"borderlink-{port}"
