"""A sound card's stream in a process of its own.

PortAudio calls back once per period (5.3 ms at 256 frames, 48 kHz) on the audio
server's realtime thread, and the callback must never wait. Its data is shared memory:
capture goes into one :class:`~.ring.SharedRing`, playback comes out of another, and
the callback itself is C (``_callback.c``), so it needs no GIL and no interpreter.
Rate conversion, drift control, gains and squelch stay in the gateway
(``soundcard``), on the tick. A Python callback, even in a process of its own with
the GC off, missed its deadline about once in three minutes.

A card that vanishes is simple to handle this way. PortAudio 19.6's JACK host waits
ten minutes for a stream whose server died, and aborts the process if terminated
under it; a stale device list needs ``Pa_Terminate`` to refresh, which would stop
every other card's stream. Instead the card's process is killed (the audio server
drops a dead client by itself) and a fresh one, with a fresh PortAudio and device
list, tries again. No other card notices.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import mmap
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from . import _callback
from .devices import DeviceNotFound, find_card, sound_cards
from .ring import SharedRing

RING_SAMPLES = 1 << 18  # 5.4 s at 48 kHz, 1.4 s at 192 kHz: room for any stall worth riding
START_TIMEOUT_S = 20.0  # a new Python process, numpy and PortAudio, on a loaded machine
CLOSE_TIMEOUT_S = 2.0  # a stream that takes longer to close is stuck: the process is killed

# The callback's counters (int64), shared with the tick; _callback.c has the same list.
(XRUNS, TX_UNDERRUNS, RX_DROPPED, WINDOW, TX_LOW, TX_LOW_WINDOW, FINISHED, FRAMES, TOTAL,
 STAMP, STAMP_FRAME, TX_MISSING) = range(12)  # fmt: skip
COUNTERS = 12
_STATUS_BYTES = COUNTERS * 8 + 8  # the counters, then the last callback's time (float64)


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
    """The shared memory of one card: status, capture ring, playback ring.

    The gateway creates it; the card's process attaches by name with a plain ``mmap``
    of ``/dev/shm/NAME`` (``SharedMemory`` would register it with a resource tracker of
    the child's own, which unlinks it when the child exits).
    """

    SIZE = _STATUS_BYTES + 2 * SharedRing.nbytes(RING_SAMPLES)

    def __init__(self, name: str | None = None) -> None:
        self.shm: shared_memory.SharedMemory | None = None
        self.map: mmap.mmap | None = None
        if name is None:
            self.shm = shared_memory.SharedMemory(create=True, size=self.SIZE)
            self.name = self.shm.name
            buf = self.shm.buf
        else:
            fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
            try:
                self.map = mmap.mmap(fd, self.SIZE)
            finally:
                os.close(fd)
            self.name = name
            buf = memoryview(self.map)
        self.status = np.ndarray(COUNTERS, np.int64, buf)
        # time.monotonic() of the last callback
        self.clock = np.ndarray(1, np.float64, buf, COUNTERS * 8)
        self.rx = SharedRing(buf, RING_SAMPLES, _STATUS_BYTES)
        self.tx = SharedRing(buf, RING_SAMPLES, _STATUS_BYTES + SharedRing.nbytes(RING_SAMPLES))
        if self.shm is not None:
            self.rx.buf.fill(0.0)  # every page mapped now, not by a page fault in a callback
            self.tx.buf.fill(0.0)

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
        """Unmap (and, in the gateway, remove) the block."""
        if self.closed:
            return
        del self.status, self.clock, self.rx, self.tx  # views first, or the block cannot close
        if self.shm is not None:
            self.shm.close()
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()


class Lane(ctypes.Structure):
    """One channel each way between a stream and its rings (``lane_t`` in ``_callback.c``)."""

    _fields_ = [
        ("rx_counters", ctypes.c_void_p), ("rx_samples", ctypes.c_void_p),
        ("rx_capacity", ctypes.c_int64),
        ("tx_counters", ctypes.c_void_p), ("tx_samples", ctypes.c_void_p),
        ("tx_capacity", ctypes.c_int64),
        ("status", ctypes.c_void_p),
        ("input_channel", ctypes.c_int32), ("output_channel", ctypes.c_int32),
        ("serving", ctypes.c_int32), ("unused", ctypes.c_int32),
        ("window", ctypes.c_int64), ("low", ctypes.c_int64),
    ]  # fmt: skip

    @classmethod
    def between(cls, rx: SharedRing, tx: SharedRing, status: np.ndarray, input_channel: int,
                output_channel: int) -> Lane:  # fmt: skip
        """Capture channel ``input_channel`` into ``rx``; play ``tx`` into ``output_channel``."""
        return cls(rx.counters.ctypes.data, rx.buf.ctypes.data, rx.capacity,
                   tx.counters.ctypes.data, tx.buf.ctypes.data, tx.capacity,
                   status.ctypes.data, input_channel, output_channel, 0, 0, -1, 0)  # fmt: skip


class _Stream(ctypes.Structure):
    _fields_ = [
        ("status", ctypes.c_void_p), ("clock", ctypes.c_void_p),
        ("input_channels", ctypes.c_int32), ("output_channels", ctypes.c_int32),
        ("lanes", ctypes.c_int32), ("unused", ctypes.c_int32),
        ("lane", ctypes.c_void_p),
    ]  # fmt: skip


if (ctypes.sizeof(_Stream), ctypes.sizeof(Lane)) != (_callback.STREAM_SIZE, _callback.LANE_SIZE):
    raise ImportError("gateway.hardware._callback was built from another _callback.c; "
                      "reinstall BorderLink (pip install -e .) to rebuild it")  # fmt: skip

_CALL = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
)(_callback.CALLBACK)


class StreamCallback:
    """PortAudio's callback for a stream, and what it serves: capture → rings → playback.

    The callback itself is C (``_callback.c``): it copies each lane's input channel into
    its capture ring and its playback ring into its output channel, and keeps the counts
    the tick needs (xruns, underruns once per run dry, the least playback level over the
    tick's window, frames per call and in all). PortAudio is given :attr:`address` and
    :attr:`userdata`; this object must outlive the stream.
    """

    def __init__(self, status: np.ndarray, clock: np.ndarray, input_channels: int,
                 output_channels: int, lanes: list[Lane]) -> None:  # fmt: skip
        self._views = (status, clock)  # the C side holds pointers into these
        self._lanes = (Lane * len(lanes))(*lanes)
        self._stream = _Stream(status.ctypes.data, clock.ctypes.data, input_channels,
                               output_channels, len(lanes), 0,
                               ctypes.addressof(self._lanes))  # fmt: skip
        self.address: int = _callback.CALLBACK
        self.userdata: int = ctypes.addressof(self._stream)

    @classmethod
    def for_card(cls, block: CardBlock, request: OpenRequest) -> StreamCallback:
        lane = Lane.between(block.rx, block.tx, block.status, request.input_channel,
                            request.output_channel)  # fmt: skip
        return cls(block.status, block.clock, request.input_channels, request.output_channels,
                   [lane])  # fmt: skip

    def __call__(self, indata: np.ndarray, outdata: np.ndarray, status_flags: int = 0) -> None:
        """Call it as PortAudio would, on C-contiguous float32 (frames, channels) arrays."""
        assert indata.dtype == outdata.dtype == np.float32
        assert indata.flags.c_contiguous and outdata.flags.c_contiguous
        _CALL(indata.ctypes.data, outdata.ctypes.data, len(outdata), None, status_flags,
              self.userdata)  # fmt: skip


def stamp(status: np.ndarray, clock: np.ndarray) -> tuple[int, float]:
    """The last callback's (first frame, time.monotonic()), read as one consistent pair."""
    while True:
        seq = int(status[STAMP])
        frame, when = int(status[STAMP_FRAME]), float(clock[0])
        if seq % 2 == 0 and int(status[STAMP]) == seq:
            return frame, when


class CardProcess:
    """The process that streams one card: started, asked to stop, or killed.

    It is ``python -m gateway.hardware.card_process`` rather than a ``multiprocessing``
    child, which would import the gateway's main script again in the child. The request
    goes in as one JSON line on its stdin, the answer comes back as one JSON line on its
    stdout; closing its stdin stops it.
    """

    def __init__(self, block: CardBlock) -> None:
        self.block = block
        self.process: subprocess.Popen[str] | None = None

    def start(self, request: OpenRequest, timeout: float = START_TIMEOUT_S) -> Opened:
        """Open the card in a new process; raises ``DeviceNotFound`` or ``OSError`` naming why."""
        self.stop()
        self.block.reset()
        process = self.process = _SPARE.take()
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(json.dumps({"block": self.block.name, **asdict(request)}) + "\n")
            process.stdin.flush()
        except OSError:
            pass  # it died waiting: read below finds EOF and says so
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else ""
        try:
            kind, *detail = json.loads(line) if line else ["died" if ready else "timeout"]
        except ValueError:
            kind, detail = "died", [line.strip()]
        if kind == "open":
            return Opened(*detail)
        self.kill()
        if kind == "not_found":
            raise DeviceNotFound(detail[0])
        if kind == "timeout":
            raise OSError(f"the card's process did not answer within {timeout:.0f} s")
        if kind == "died":
            raise OSError("the card's process died while opening the device")
        raise OSError(detail[0])

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Close the stream and end the process; killed if it does not end in ``timeout``."""
        if self.process is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """End the process now: a stream stuck in PortAudio is never touched again."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError, ValueError):
                stream.close()  # type: ignore[union-attr]
        self.process = None


class _Spare:
    """One card process started ahead, waiting for its request.

    Starting Python and importing NumPy takes about 0.4 s, and a reload that adds a
    radio opens its card between two ticks: with a process already waiting, opening is
    PortAudio's own time. The spare does not load PortAudio until its request comes, so
    it sees the devices as they are then. Nor is it used if this process's environment
    changed since it started (``JACK_DEFAULT_SERVER`` names another audio server).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen[str] | None = None
        self.environ: dict[str, str] = {}  # the spare's, as it was started
        atexit.register(self.close)

    def take(self) -> subprocess.Popen[str]:
        with self.lock:
            process, self.process = self.process, None
            stale = self.environ != dict(os.environ)
        if process is not None and stale:
            _end(process)
            process = None
        if process is None or process.poll() is not None:
            process = _spawn()
        threading.Thread(target=self._refill, daemon=True, name="spare card process").start()
        return process

    def _refill(self) -> None:
        environ = dict(os.environ)
        process = _spawn()
        with self.lock:
            if self.process is None:
                self.process, process = process, None
                self.environ = environ
        if process is not None:  # another refill was first
            _end(process)

    def close(self) -> None:
        with self.lock:
            process, self.process = self.process, None
        if process is not None:
            _end(process)


def _spawn() -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gateway.hardware.card_process"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            bufsize=1)  # fmt: skip


def _end(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(OSError, ValueError):
        process.stdin.close()  # type: ignore[union-attr]
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(CLOSE_TIMEOUT_S)
    if process.poll() is None:
        process.kill()
        process.wait()
    with contextlib.suppress(OSError, ValueError):
        process.stdout.close()  # type: ignore[union-attr]


_SPARE = _Spare()


# --- the card's process ---------------------------------------------------------------


def main() -> None:
    # The answer goes out on our stdout as it was given to us; fd 1 itself is pointed at
    # stderr, so whatever a library prints (JACK, ALSA) is not taken for the answer.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    line = sys.stdin.readline()
    if not line:
        return  # a spare the gateway did not need
    fields = json.loads(line)
    block = fields.pop("block")

    def answer(*message: object) -> None:
        print(json.dumps(message), file=answers, flush=True)

    _serve(OpenRequest(**fields), block, answer)


def _serve(request: OpenRequest, block_name: str, answer: Callable[..., None]) -> None:
    # Ctrl-C reaches the whole process group: the gateway stops its cards in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not lock_memory():
        print(f"{request.client_name}: cannot lock the card's process in memory (needs "
              "CAP_IPC_LOCK or a larger 'ulimit -l'); a page fault in its callback is an "
              "xrun", file=sys.stderr, flush=True)  # fmt: skip
    block = CardBlock(block_name)
    try:
        stream = _open(request, block, answer)
    except Exception as exc:  # the gateway gets the reason, not a silent death
        answer("error", f"{type(exc).__name__}: {exc}")
        return
    if stream is None:
        return
    for line in sys.stdin:  # until the gateway closes our stdin (or is gone)
        if line.strip() == "close":
            break
    stream.abort(ignore_errors=True)
    stream.close(ignore_errors=True)


def lock_memory() -> bool:
    """Keep every page of this process in RAM (``mlockall``), as audio servers do.

    A page the kernel evicted (code not run for a while, under memory pressure or a
    proactive reclaimer such as DAMON) is read back from disk by a fault the next time
    it is touched: in a callback that is a stall of milliseconds, and an xrun. Needs
    CAP_IPC_LOCK or a large enough ``ulimit -l``; without it the process runs unlocked.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    mcl_current, mcl_future = 1, 2
    return libc.mlockall(mcl_current | mcl_future) == 0


def _open(request: OpenRequest, block: CardBlock, answer: Callable[..., None]) -> Any:
    import sounddevice as sd

    name_jack_client(sd, request.client_name)
    try:
        card = find_card(request.device, request.host_api, request.input_channels,
                         request.output_channels, sound_cards())  # fmt: skip
    except DeviceNotFound as exc:
        answer("not_found", str(exc))
        return None
    rate = request.sample_rate or int(card.default_rate)

    def finished() -> None:
        block.status[FINISHED] = 1

    try:
        stream = open_stream(sd, card.index, rate, request.input_channels,
                             request.output_channels, request.blocksize, request.latency,
                             StreamCallback.for_card(block, request), finished)  # fmt: skip
    except sd.PortAudioError as exc:
        answer("cannot_open", f"sound card {card.index} ({card.name}): cannot open: "
               f"{explain(exc, request, rate)}")  # fmt: skip
        return None
    answer("open", rate, card.line().strip())
    return stream


def open_stream(sd: Any, device: int, rate: int, input_channels: int, output_channels: int,
                blocksize: int, latency: float | str, callback: StreamCallback,
                finished: Callable[[], None]) -> Any:  # fmt: skip
    """Open and start a float32 duplex stream served by the C callback.

    ``sounddevice._StreamBase`` is the class sounddevice keeps for a callback given as a
    C function pointer (rtmixer uses it the same way).
    """
    stream = sd._StreamBase(
        kind="duplex",
        device=(device, device),
        samplerate=rate,
        channels=(input_channels, output_channels),
        dtype="float32",
        blocksize=blocksize,
        latency=latency,
        callback=sd._ffi.cast("PaStreamCallback *", callback.address),
        userdata=sd._ffi.cast("void *", callback.userdata),
        finished_callback=finished,
    )
    stream._borderlink_callback = callback  # the C side's data lives as long as the stream
    stream.start()
    return stream


_CLIENT_NAME: list[ctypes.Array[ctypes.c_char]] = []  # PortAudio keeps the pointer


def name_jack_client(sd: Any, name: str) -> None:
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


if __name__ == "__main__":
    main()
