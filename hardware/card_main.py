"""The card's own process: PortAudio runs the C callback between one card and two rings.

This is all a card's process runs, and it is small on purpose: a site box (a Raspberry
Pi-class board with a few USB sound cards) runs one per radio.

* ``card_process`` starts it as ``python -I -S -c BOOT``: isolated from the user's
  environment, no site-packages scan, only this folder and sounddevice's (with cffi's
  backend) on its path, and the packages' ``__init__`` files skipped (``gateway``'s
  reads the installed version through ``importlib.metadata``: 6 MB). No NumPy: the
  shared block is used by address, and only the C callback touches samples.
* It locks in memory only what the callback touches (:func:`lock_callback_pages`): the
  shared block, the code of the callback and of the audio libraries that call it, and
  the callback thread's stack. ``mlockall`` locked every page of every library and
  thread stack and the JACK server's segment: about 250 MB per card. That segment is
  the server's to lock (``jackd -R`` does).

The gateway's side (starting and stopping this process, NumPy views of the block) is
``card_process``. The request comes as one JSON line on stdin, the answer goes back as
one JSON line on stdout; stdin closing stops the stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _callback
from .devices import DeviceNotFound, find_card, sound_cards

# The card process's first lines: "gateway" and "gateway.hardware" as bare packages (their
# __init__ files are not run), then this module. argv: the hardware folder, then the
# folders sounddevice and cffi's backend are in.
BOOT = """\
import sys, types
hardware, *path = sys.argv[1:]
sys.path[:0] = path
for name, where in (("gateway", []), ("gateway.hardware", [hardware])):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = where
from gateway.hardware.card_main import main
main()
"""

RING_SAMPLES = 1 << 18  # 5.4 s at 48 kHz, 1.4 s at 192 kHz: room for any stall worth riding
RING_BYTES = _callback.RING_HEADER_BYTES + 4 * RING_SAMPLES

# The callback's counters (int64), shared with the tick; _callback.c has the same list.
XRUNS, TX_UNDERRUNS, RX_DROPPED, FINISHED, FRAMES, TOTAL, STAMP, STAMP_FRAME = range(8)
COUNTERS = 8
STATUS_BYTES = COUNTERS * 8 + 8  # the counters, then the last callback's time (float64)
BLOCK_BYTES = STATUS_BYTES + 2 * RING_BYTES  # status, capture ring, playback ring

# What the callback runs besides itself, by library file name: PortAudio, the audio
# server's client library or ALSA's, and the C library (memset, clock_gettime).
AUDIO_LIBRARIES = ("_callback.", "libportaudio.", "libjack.", "libasound.", "libc.")
STACK_BYTES = 64 * 1024  # locked each side of the callback's stack pointer
STACK_WAIT_S = 2.0  # for the first callback, to know where its stack is


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


class Lane(ctypes.Structure):
    """One channel each way between a stream and its rings (``lane_t`` in ``_callback.c``)."""

    _fields_ = [
        ("rx_counters", ctypes.c_void_p),
        ("rx_samples", ctypes.c_void_p),
        ("rx_capacity", ctypes.c_int64),
        ("tx_counters", ctypes.c_void_p),
        ("tx_samples", ctypes.c_void_p),
        ("tx_capacity", ctypes.c_int64),
        ("status", ctypes.c_void_p),
        ("input_channel", ctypes.c_int32),
        ("output_channel", ctypes.c_int32),
        ("serving", ctypes.c_int32),
        ("unused", ctypes.c_int32),
    ]

    @classmethod
    def at(
        cls,
        rx: int,
        rx_capacity: int,
        tx: int,
        tx_capacity: int,
        status: int,
        input_channel: int,
        output_channel: int,
    ) -> Lane:
        """Capture ``input_channel`` into the ring at address ``rx``; play the ring at ``tx``
        into ``output_channel``; count into the counters at ``status``."""
        header = _callback.RING_HEADER_BYTES
        return cls(
            rx,
            rx + header,
            rx_capacity,
            tx,
            tx + header,
            tx_capacity,
            status,
            input_channel,
            output_channel,
            0,
            0,
        )


class Stream(ctypes.Structure):
    """What PortAudio hands the C callback as its userData (``stream_t``)."""

    _fields_ = [
        ("status", ctypes.c_void_p),
        ("clock", ctypes.c_void_p),
        ("input_channels", ctypes.c_int32),
        ("output_channels", ctypes.c_int32),
        ("lanes", ctypes.c_int32),
        ("unused", ctypes.c_int32),
        ("lane", ctypes.c_void_p),
    ]

    @classmethod
    def of(
        cls, status: int, clock: int, input_channels: int, output_channels: int, lanes: list[Lane]
    ) -> Stream:
        array = (Lane * len(lanes))(*lanes)
        stream = cls(
            status, clock, input_channels, output_channels, len(lanes), 0, ctypes.addressof(array)
        )
        stream.lane_array = array  # the C side points into it
        return stream

    @property
    def userdata(self) -> int:
        return ctypes.addressof(self)


if (ctypes.sizeof(Stream), ctypes.sizeof(Lane)) != (_callback.STREAM_SIZE, _callback.LANE_SIZE):
    raise ImportError(
        "gateway.hardware._callback was built from another _callback.c; "
        "reinstall BorderLink (pip install -e .) to rebuild it"
    )


class Block:
    """The card's shared block (made by the gateway) as addresses for the C callback.

    It is a plain ``mmap`` of ``/dev/shm/NAME``: ``SharedMemory`` would register it with
    a resource tracker of this process's own, which unlinks it when this process exits.
    """

    def __init__(self, name: str) -> None:
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, BLOCK_BYTES)
        finally:
            os.close(fd)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.status = self.address
        self.clock = self.address + COUNTERS * 8
        self.rx = self.address + STATUS_BYTES
        self.tx = self.rx + RING_BYTES

    def stream(self, request: OpenRequest) -> Stream:
        lane = Lane.at(
            self.rx,
            RING_SAMPLES,
            self.tx,
            RING_SAMPLES,
            self.status,
            request.input_channel,
            request.output_channel,
        )
        return Stream.of(
            self.status, self.clock, request.input_channels, request.output_channels, [lane]
        )

    def mark_finished(self) -> None:
        ctypes.c_int64.from_address(self.status + 8 * FINISHED).value = 1


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

    serve(OpenRequest(**fields), Block(block), answer)


def serve(request: OpenRequest, block: Block, answer: Callable[..., None]) -> None:
    """Stream until the gateway closes our stdin (or is gone)."""
    # Ctrl-C reaches the whole process group: the gateway stops its cards in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stream = _open(request, block, answer)
    except Exception as exc:  # the gateway gets the reason, not a silent death
        answer("error", f"{type(exc).__name__}: {exc}")
        return
    if stream is None:
        return
    failed = lock_callback_pages(block)
    if failed:
        print(
            f"{request.client_name}: cannot lock {', '.join(failed)} in memory (needs "
            "CAP_IPC_LOCK or a larger 'ulimit -l'); a page fault in the callback is an "
            "xrun",
            file=sys.stderr,
            flush=True,
        )
    for line in sys.stdin:
        if line.strip() == "close":
            break
    stream.abort(ignore_errors=True)
    stream.close(ignore_errors=True)


def lock_callback_pages(block: Block) -> list[str]:
    """Keep what the callback touches in RAM (``mlock``); returns what could not be locked.

    A page the kernel evicted (code not run for a while, under memory pressure or a
    proactive reclaimer such as DAMON) is read back by a fault the next time it is
    touched: in a callback that is a stall of milliseconds, and an xrun. Locked here:
    the shared block, the executable pages of the libraries on the callback's path, and
    the callback thread's stack around where it runs (known after its first call).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ranges = [("the shared block", block.address, block.address + BLOCK_BYTES)]
    mappings = _mappings()
    for start, end, perms, path in mappings:
        if "x" in perms and os.path.basename(path).startswith(AUDIO_LIBRARIES):
            ranges.append((os.path.basename(path), start, end))
    stack = _callback_stack()
    for start, end, _, _ in mappings:
        if start <= stack < end:
            page = mmap.PAGESIZE
            low = max(start, (stack - STACK_BYTES) // page * page)
            ranges.append(("the callback's stack", low, min(end, stack + STACK_BYTES)))
    return [what for what, start, end in ranges if libc.mlock(start, end - start) != 0]


def _mappings() -> list[tuple[int, int, str, str]]:
    """This process's mappings: (start, end, permissions, file or '')."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append((start, end, fields[1], fields[5].strip() if len(fields) > 5 else ""))
    return found


def _callback_stack() -> int:
    """An address on the callback thread's stack, once it has been called (0: never)."""
    deadline = time.monotonic() + STACK_WAIT_S
    while not _callback.callback_stack() and time.monotonic() < deadline:
        time.sleep(0.01)
    return _callback.callback_stack() or 0


def _open(request: OpenRequest, block: Block, answer: Callable[..., None]) -> Any:
    import sounddevice as sd

    name_jack_client(sd, request.client_name)
    try:
        card = find_card(
            request.device,
            request.host_api,
            request.input_channels,
            request.output_channels,
            sound_cards(),
        )
    except DeviceNotFound as exc:
        answer("not_found", str(exc))
        return None
    rate = request.sample_rate or int(card.default_rate)
    try:
        stream = open_stream(
            sd,
            card.index,
            rate,
            request.input_channels,
            request.output_channels,
            request.blocksize,
            request.latency,
            block.stream(request),
            block.mark_finished,
        )
    except sd.PortAudioError as exc:
        answer(
            "cannot_open",
            f"sound card {card.index} ({card.name}): cannot open: {explain(exc, request, rate)}",
        )
        return None
    answer("open", rate, card.line().strip())
    return stream


def open_stream(
    sd: Any,
    device: int,
    rate: int,
    input_channels: int,
    output_channels: int,
    blocksize: int,
    latency: float | str,
    userdata: Stream,
    finished: Callable[[], None],
) -> Any:
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
        callback=sd._ffi.cast("PaStreamCallback *", _callback.CALLBACK),
        userdata=sd._ffi.cast("void *", userdata.userdata),
        finished_callback=finished,
    )
    stream._borderlink_userdata = userdata  # the C side's data lives as long as the stream
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
        return (
            f"{rate} Hz is not a rate this device runs at (with JACK the rate is "
            f"the server's); set sample_rate to one it supports"
        )
    if "-9985" in text or "busy" in text.lower() or "unavailable" in text.lower():
        return "the device is busy (another program has it open); close it or pick another card"
    if "-9998" in text or "Invalid number of channels" in text:
        return (
            f"the device has fewer channels than asked for "
            f"(in {request.input_channels}, out {request.output_channels})"
        )
    return text
