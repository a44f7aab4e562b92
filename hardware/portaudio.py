"""The process's PortAudio, and renewing it when a vanished card (or audio server) is back.

PortAudio reads its device list once, when it is initialised: a USB card plugged in
again, or a JACK server started again, is invisible (or a stale entry) until
``Pa_Terminate``/``Pa_Initialize`` — which invalidates every stream in the process.
Worse, when the JACK server dies under a stream, PortAudio 19.6's JACK host API
waits **ten minutes** for that stream to stop (a condition only the dead server's
process callback would signal), and ``Pa_Terminate`` waits behind it, then asserts
on the dead client and aborts the process. That instance of the library can never
be terminated safely.

So a card that vanished is handled in three steps (see ``SoundCard._reopen``):

1. its dead stream is stopped on a helper thread; if that does not return promptly
   the stream is *abandoned* (:func:`abandon`): kept referenced for ever, so nothing
   closes it or frees its callback, and this instance is marked broken;
2. the device's return is probed in a child process (:func:`probe`), whose own
   PortAudio scans the devices, so ours is not touched while others' streams run;
3. once it is back, PortAudio is renewed once for the whole process
   (:func:`reinitialise`): in place when no stream is wedged in it, otherwise as a
   fresh copy of the shared library (its own globals, a new JACK client under the
   same name), leaving the wedged instance alone for good. Every card reopens on it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Any

from .devices import Card

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
_PROBE = (
    "import json, sounddevice as sd\n"
    "apis = sd.query_hostapis()\n"
    "print(json.dumps([[d['index'], d['name'], apis[d['hostapi']]['name'],"
    " d['max_input_channels'], d['max_output_channels'], d['default_samplerate']]"
    " for d in sd.query_devices()]))\n"
)

LOCK = threading.RLock()  # held while the library is being swapped
generation = 0  # bumped by every renewal; a stream remembers the one it was opened on
counts = {"renewals": 0, "abandoned_streams": 0, "probes": 0}
_broken: set[int] = set()  # generations with a stream wedged inside
_abandoned: list[Any] = []  # never closed, never collected (their callbacks stay valid)
_lib_path: str | None = None  # the file the current instance was loaded from (None: sounddevice's)
_client_name: bytes | None = None  # the JACK client name, carried over to a fresh instance
_copies: str | None = None  # folder of the fresh copies, removed at exit
_names: list[ctypes.Array[ctypes.c_char]] = []  # PortAudio keeps the pointer: keep the buffers


def abandon(stream: Any, stream_generation: int) -> None:
    """``stream`` is stuck in PortAudio: never touch it again, and never terminate its instance."""
    with LOCK:
        _abandoned.append(stream)
        _broken.add(stream_generation)
        counts["abandoned_streams"] += 1


def broken(gen: int | None = None) -> bool:
    """Has a stream wedged in instance ``gen`` (default: the current one)?"""
    return (generation if gen is None else gen) in _broken


def _library() -> ctypes.CDLL | None:
    import sounddevice as sd

    try:
        return ctypes.CDLL(_lib_path or sd._libname)
    except OSError:
        return None


def remember_client_name() -> None:
    """Note the JACK client name the current (healthy) instance uses, for a fresh copy later."""
    global _client_name
    lib = _library()
    if lib is None:
        return
    name = ctypes.c_char_p()
    with contextlib.suppress(AttributeError):  # a PortAudio built without JACK
        if lib.PaJack_GetClientName(ctypes.byref(name)) == 0 and name.value:
            _client_name = name.value


def probe(timeout: float = PROBE_TIMEOUT_S) -> list[Card] | None:
    """The sound cards a fresh PortAudio sees now, scanned in a child process (None: no answer).

    The child inherits the environment (``JACK_DEFAULT_SERVER`` included), so it looks
    where this process's streams would.
    """
    counts["probes"] += 1
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                              timeout=timeout, env=os.environ.copy())  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("sound card probe gave no answer: %s", exc)
        return None
    if done.returncode != 0:
        log.info("sound card probe failed: %s", done.stderr.strip()[-300:])
        return None
    try:
        rows = json.loads(done.stdout.strip().splitlines()[-1])
        return [Card(int(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]), float(r[5]))
                for r in rows]  # fmt: skip
    except (ValueError, IndexError, TypeError) as exc:
        log.info("sound card probe answered nonsense (%s): %r", exc, done.stdout[-300:])
        return None


def reinitialise() -> int:
    """Renew the process's PortAudio (every stream must be closed or abandoned); new generation.

    In place (terminate, initialise) when the current instance is healthy; otherwise
    a fresh copy of the library is loaded and sounddevice pointed at it.
    """
    global generation
    import sounddevice as sd

    with LOCK:
        if not broken():
            while sd._initialized:
                sd._terminate()
            sd._initialize()
            how = "re-initialised"
        else:
            _load_fresh_copy(sd)
            how = "loaded afresh (the old instance has a stream stuck in it)"
        generation += 1
        counts["renewals"] += 1
    log.warning("PortAudio %s: device list rescanned, streams reopen", how)
    return generation


def _load_fresh_copy(sd: Any) -> None:
    """A second ``dlopen`` of the same file returns the same instance; a copy is a new one."""
    global _lib_path, _copies
    source = _original_file(sd)
    if _copies is None:
        _copies = tempfile.mkdtemp(prefix="borderlink-portaudio-")
        atexit.register(shutil.rmtree, _copies, True)
    path = os.path.join(_copies, f"libportaudio-{generation + 1}.so")
    shutil.copyfile(source, path)
    lib = sd._ffi.dlopen(path)
    if _client_name:
        name = ctypes.create_string_buffer(_client_name)
        _names.append(name)
        with contextlib.suppress(AttributeError):  # a PortAudio built without JACK
            ctypes.CDLL(path).PaJack_SetClientName(name)
    sd._lib = lib
    sd._initialized = 0  # the old instance stays initialised, untouched, for good
    _lib_path = path
    sd._initialize()


def _original_file(sd: Any) -> str:
    """The file sounddevice loaded PortAudio from (it may have asked by bare soname)."""
    if os.path.isabs(sd._libname):
        return str(sd._libname)
    base = os.path.basename(sd._libname).split(".so")[0] + ".so"
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            path = line.split()[-1]
            if path.startswith("/") and os.path.basename(path).startswith(base) \
                    and "borderlink-portaudio-" not in path:
                return path
    raise OSError(f"cannot find the loaded {sd._libname} to load PortAudio afresh")


def skip_terminate_at_exit() -> None:
    """At exit, sounddevice terminates PortAudio; on a broken instance that hangs or aborts."""
    if broken():
        import sounddevice as sd

        sd._initialized = 0
