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
import importlib.util
import json
import mmap
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from . import _callback, card_main
from .card_main import (  # noqa: F401  (the card's layout and request, for the gateway's side)
    BLOCK_BYTES,
    COUNTERS,
    FINISHED,
    FRAMES,
    RING_SAMPLES,
    RX_DROPPED,
    STAMP,
    STAMP_FRAME,
    STATUS_BYTES,
    TOTAL,
    TX_UNDERRUNS,
    XRUNS,
    OpenRequest,
    name_jack_client,
)
from .devices import DeviceNotFound
from .ring import SharedRing

START_TIMEOUT_S = 20.0  # a new Python process and PortAudio, on a loaded machine
CLOSE_TIMEOUT_S = 2.0  # a stream that takes longer to close is stuck: the process is killed


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

    SIZE = BLOCK_BYTES

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
        self.rx = SharedRing(buf, RING_SAMPLES, STATUS_BYTES)
        self.tx = SharedRing(buf, RING_SAMPLES, STATUS_BYTES + SharedRing.nbytes(RING_SAMPLES))
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


class Lane(card_main.Lane):
    """A lane between NumPy-held rings (the test suite's radio simulator, the benches)."""

    @classmethod
    def between(
        cls,
        rx: SharedRing,
        tx: SharedRing,
        status: np.ndarray,
        input_channel: int,
        output_channel: int,
    ) -> Lane:
        """Capture channel ``input_channel`` into ``rx``; play ``tx`` into ``output_channel``."""
        return cls.at(
            rx.address,
            rx.capacity,
            tx.address,
            tx.capacity,
            status.ctypes.data,
            input_channel,
            output_channel,
        )


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
    the tick needs (xruns, underruns once per run dry, frames per call and in all, the
    last call's time). A card's own process builds its stream
    from addresses (``card_main``); this builds one over NumPy arrays, for a stream in a
    process that has them. It must outlive the stream.
    """

    def __init__(
        self,
        status: np.ndarray,
        clock: np.ndarray,
        input_channels: int,
        output_channels: int,
        lanes: list[card_main.Lane],
    ) -> None:
        self._views = (status, clock)  # the C side holds pointers into these
        self.stream = card_main.Stream.of(
            status.ctypes.data, clock.ctypes.data, input_channels, output_channels, lanes
        )
        self.address: int = _callback.CALLBACK
        self.userdata: int = self.stream.userdata

    @classmethod
    def for_card(cls, block: CardBlock, request: OpenRequest) -> StreamCallback:
        lane = Lane.between(
            block.rx, block.tx, block.status, request.input_channel, request.output_channel
        )
        return cls(
            block.status, block.clock, request.input_channels, request.output_channels, [lane]
        )

    def __call__(self, indata: np.ndarray, outdata: np.ndarray, status_flags: int = 0) -> None:
        """Call it as PortAudio would, on C-contiguous float32 (frames, channels) arrays."""
        assert indata.dtype == outdata.dtype == np.float32
        assert indata.flags.c_contiguous and outdata.flags.c_contiguous
        _CALL(
            indata.ctypes.data, outdata.ctypes.data, len(outdata), None, status_flags, self.userdata
        )


def open_stream(
    sd: Any,
    device: int,
    rate: int,
    input_channels: int,
    output_channels: int,
    blocksize: int,
    latency: float | str,
    callback: StreamCallback,
    finished: Callable[[], None],
) -> Any:
    """A stream served by ``callback`` in this process (``card_main.open_stream``)."""
    stream = card_main.open_stream(
        sd,
        device,
        rate,
        input_channels,
        output_channels,
        blocksize,
        latency,
        callback.stream,
        finished,
    )
    stream._borderlink_callback = callback  # its NumPy views live as long as the stream
    return stream


def stamp(status: np.ndarray, clock: np.ndarray) -> tuple[int, float]:
    """The last callback's (first frame, time.monotonic()), read as one consistent pair."""
    return _callback.stamp(status, clock)


class CardProcess:
    """The process that streams one card: started, asked to stop, or killed.

    It is a fresh, small Python running ``card_main`` (see there) rather than a
    ``multiprocessing`` child, which would import the gateway's main script again in the
    child. The request goes in as one JSON line on its stdin, the answer comes back as
    one JSON line on its stdout; closing its stdin stops it.
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

    Starting Python takes a while on a loaded machine, and a reload that adds a radio
    opens its card between two ticks: with a process already waiting, opening is
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
    return subprocess.Popen(
        card_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )


def card_command() -> list[str]:
    """The card's process: ``python -I -S`` running ``card_main``, with only this package's
    folder and those of sounddevice and cffi's backend on its path (``card_main.BOOT``)."""
    path = []
    for module in ("sounddevice", "_sounddevice", "_cffi_backend"):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ImportError(f"{module} is not installed; reinstall BorderLink")
        folder = os.path.dirname(spec.origin)
        if folder not in path:
            path.append(folder)
    hardware = os.path.dirname(os.path.abspath(__file__))
    return [sys.executable, "-I", "-S", "-c", card_main.BOOT, hardware, *path]


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


def lock_memory() -> bool:
    """Keep every page of this process in RAM (``mlockall``), as audio servers do.

    For the test suite's radio simulator and the benches' own streams, which run in a
    NumPy process; a card's process locks only what its callback touches
    (``card_main.lock_callback_pages``). Needs CAP_IPC_LOCK or a large ``ulimit -l``.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    mcl_current, mcl_future = 1, 2
    return libc.mlockall(mcl_current | mcl_future) == 0


def jack_client_name(port: str) -> str:
    """The JACK client a radio port's card shows as: ``borderlink-<port>``."""
    return f"borderlink-{port}"
