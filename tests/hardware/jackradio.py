"""A real audio path for radio tests: a uniquely named JACK server (dummy backend) and a
JACK client that plays the radios — it feeds known audio into each radio port's capture
side and records what the gateway sends to its playback side, sample-locked to JACK's
frame counter so delays can be measured by cross-correlation.

jackd must be up before PortAudio scans devices, so the server is started (and
PortAudio re-initialised if something imported sounddevice earlier) before any
stream opens. The server is stopped by PID at the end.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
from gateway.hardware.card_process import lock_memory

from tests.conftest import require_binary

RATE = 48000
PERIOD = 256
PASS_THROUGH = "PortAudio"  # the JACK client of a stream opened in a test's own process


def card_client(port: str) -> str:
    """The JACK client of a radio port's sound card (each card streams in its own process)."""
    from gateway.hardware.card_process import jack_client_name

    return jack_client_name(port)


def wait_for(condition, timeout: float, what: str, interval: float = 0.01):
    """Poll ``condition`` until it is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def start_jackd(name: str, rate: int = RATE, period: int = PERIOD) -> subprocess.Popen:
    jackd = require_binary("jackd")
    env = {**os.environ, "JACK_NO_AUDIO_RESERVATION": "1"}
    for realtime in (["-R"], ["--no-realtime"]):
        proc = subprocess.Popen(
            [jackd, "-n", name, *realtime, "-d", "dummy", "-r", str(rate), "-p", str(period)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
        )
        lsp_env = {**os.environ, "JACK_DEFAULT_SERVER": name}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            out = subprocess.run(["jack_lsp"], env=lsp_env, capture_output=True, text=True)
            if "system:playback_1" in out.stdout:
                return proc
            time.sleep(0.05)
        errors = proc.stderr.read().decode(errors="replace")[-600:] if proc.stderr else ""
        stop_jackd(proc)
    raise RuntimeError(f"jackd -n {name} did not start: {errors}")


def stop_jackd(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def portaudio_on(server: str) -> None:
    """Point this process's PortAudio at ``server`` (rescans the device list)."""
    os.environ["JACK_DEFAULT_SERVER"] = server
    import sounddevice as sd

    while sd._initialized:
        sd._terminate()
    sd._initialize()


def portaudio_off() -> None:
    """Terminate PortAudio before its JACK server goes (it asserts if the server left first)."""
    import sounddevice as sd

    while sd._initialized:
        sd._terminate()


class RadioSim:
    """The radios' side of the sound cards: per radio, a signal to play and a recording.

    The JACK client runs in a process of its own: its process callback is Python, and in
    the process under test it would wait for that process's GIL (the gateway's tick, its
    own card callbacks), come late, and make the server report xruns that are the
    simulator's, not the gateway's. The recording and the frame counter are in shared
    memory; commands (play, connect) go over a pipe.
    """

    def __init__(self, server: str, radios: int, seconds: float = 20.0) -> None:
        size = int(seconds * RATE)
        self.radios, self.size = radios, size
        self._shm = shared_memory.SharedMemory(create=True, size=(radios * size + 2) * 4 + 16)
        self._counter = np.ndarray(2, np.int64, self._shm.buf)  # frames done, blocksize
        self._record = np.ndarray((radios, size), np.float32, self._shm.buf, offset=16)
        self._record.fill(0.0)  # every page mapped now, not by a page fault in the callback
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_sim_main, args=(server, radios, size, self._shm.name,
                                                         child), daemon=True)  # fmt: skip
        self._proc.start()
        child.close()
        if not self._pipe.poll(20):
            self.close()
            raise RuntimeError(f"the radio simulator did not start on JACK server {server}")
        self.rate, self.blocksize = self._pipe.recv()

    def _ask(self, *command, timeout: float = 10.0):
        self._pipe.send(command)
        if not self._pipe.poll(timeout):
            raise RuntimeError(f"the radio simulator did not answer {command[0]}")
        answer = self._pipe.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def frame(self) -> int:
        """Frames since activation, advanced by the simulator's process callback."""
        return int(self._counter[0])

    def connect(self, radio: int, client: str, timeout: float = 15.0) -> None:
        """Wire radio ``radio`` to a sound card's JACK ``client`` (in_0 / out_0), once it
        shows up (a card's process may still be starting)."""
        self._ask("connect", radio, client, timeout, timeout=timeout + 5)

    def start(self, radio: int, signal: np.ndarray, delay: float = 0.0, loop: bool = False) -> int:
        """Play ``signal`` into the radio's receiver; returns the JACK frame it starts at."""
        return self._ask("start", radio, signal.astype(np.float32), delay, loop)

    def silence(self, radio: int) -> None:
        self._ask("silence", radio)

    def monotonic_at(self, frame: int) -> float:
        """When (time.monotonic) the JACK cycle holding ``frame`` was processed."""
        return self._ask("monotonic_at", frame)

    def recorded(self, radio: int, since: int = 0) -> np.ndarray:
        return self._record[radio, since : min(self.frame, self.size)].copy()

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._pipe.send(("close",))
                self._proc.join(5)
            except OSError:
                pass
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._pipe.close()
        del self._counter, self._record
        self._shm.close()
        self._shm.unlink()


class _SimClient:
    """The simulator's JACK client, in its own process (see :class:`RadioSim`)."""

    def __init__(self, server: str, radios: int, size: int, shm: shared_memory.SharedMemory):
        import jack

        os.environ["JACK_DEFAULT_SERVER"] = server
        self.client = jack.Client(f"radiosim{os.getpid()}", no_start_server=True)
        self.outs = [self.client.outports.register(f"speaker_{i}") for i in range(radios)]
        self.ins = [self.client.inports.register(f"mic_{i}") for i in range(radios)]
        self.play = [np.zeros(0, np.float32) for _ in range(radios)]
        self.play_at = [0] * radios
        self.loop = [False] * radios
        self.counter = np.ndarray(2, np.int64, shm.buf)
        self.record = np.ndarray((radios, size), np.float32, shm.buf, offset=16)
        self.counter[:] = (0, self.client.blocksize)
        self.frame = 0
        self.clock: list[tuple[int, float]] = []  # (first frame of a cycle, monotonic time)
        self.lock = threading.Lock()
        self.client.set_process_callback(self._process)
        self.client.activate()

    def _process(self, frames: int) -> None:
        start = self.frame
        for i, (out, inp) in enumerate(zip(self.outs, self.ins, strict=True)):
            buf = out.get_array()
            buf.fill(0.0)
            sig, at = self.play[i], self.play_at[i]
            if len(sig):  # slices only: the lighter this callback, the fewer xruns it causes
                first = max(at, start)  # first frame of this cycle that plays the signal
                offset = first - at
                while first < start + frames and (self.loop[i] or offset < len(sig)):
                    if self.loop[i]:
                        offset %= len(sig)
                    n = min(start + frames - first, len(sig) - offset)
                    buf[first - start : first - start + n] = sig[offset : offset + n]
                    first, offset = first + n, offset + n
            if start + frames <= self.record.shape[1]:
                self.record[i, start : start + frames] = inp.get_array()
        self.frame = start + frames
        self.counter[0] = self.frame  # after the recording: a reader never sees unwritten audio
        if len(self.clock) < 100000:
            self.clock.append((start, time.monotonic()))

    def connect(self, radio: int, client: str, timeout: float) -> None:
        c = self.client
        mic, speaker = f"{client}:in_0", f"{client}:out_0"
        deadline = time.monotonic() + timeout
        while not (c.get_ports(f"^{client}:in_0$") and c.get_ports(f"^{client}:out_0$")):
            if time.monotonic() > deadline:
                raise AssertionError(f"no JACK client {client} after {timeout}s")
            time.sleep(0.02)
        for port in c.get_all_connections(mic):
            c.disconnect(port, mic)
        for port in c.get_all_connections(speaker):
            c.disconnect(speaker, port)
        c.connect(self.outs[radio], mic)
        c.connect(speaker, self.ins[radio])

    def start(self, radio: int, signal: np.ndarray, delay: float, loop: bool) -> int:
        with self.lock:
            at = self.frame + int(delay * self.client.samplerate) + 2 * self.client.blocksize
            self.play[radio], self.play_at[radio], self.loop[radio] = signal, at, loop
        return at

    def silence(self, radio: int) -> None:
        self.play[radio] = np.zeros(0, np.float32)

    def monotonic_at(self, frame: int) -> float:
        starts = np.array([c[0] for c in self.clock])
        i = max(0, int(np.searchsorted(starts, frame, side="right")) - 1)
        return self.clock[i][1]

    def close(self) -> None:
        self.client.deactivate()
        self.client.close()


def _sim_main(server: str, radios: int, size: int, shm_name: str, pipe) -> None:
    gc.disable()  # a full collection would pause the process callback (an xrun), as for cards
    lock_memory()  # …and so would a page fault on evicted code
    shm = shared_memory.SharedMemory(name=shm_name)
    sim = _SimClient(server, radios, size, shm)
    pipe.send((sim.client.samplerate, sim.client.blocksize))
    try:
        while True:
            name, *args = pipe.recv()
            if name == "close":
                break
            try:
                pipe.send(getattr(sim, name)(*args))
            except Exception as exc:  # the test sees it raised by the call that caused it
                pipe.send(exc)
    except EOFError:
        pass  # the test process is gone
    finally:
        sim.close()
        del sim.counter, sim.record  # views of the shared block: gone before it closes
        shm.close()


def site_toml(radios: dict[str, str], extra: str = "", members: list[str] | None = None) -> str:
    """A site config with the given ``[ports.NAME]`` bodies in one talkgroup."""
    parts = ['[site]\nname = "radio test"\ncountry = "US"\n']
    for name, body in radios.items():
        parts.append(f"[ports.{name}]\n{body.strip()}\n")
    names = members or list(radios)
    parts.append(f"[talkgroups.tg]\nmembers = {names!r}\n".replace("'", '"'))
    parts.append(extra)
    return "\n".join(parts)


def hid_reports(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + 5] for i in range(0, len(data) - len(data) % 5, 5)]


def hid_keyed(path: Path, gpio: int = 3) -> bool | None:
    """PTT state from the last output report written to a file standing in for /dev/hidrawN."""
    reports = hid_reports(path)
    if not reports:
        return None
    bit = 1 << (gpio - 1)
    return bool(reports[-1][2] & bit)




def tone(hz: float, seconds: float, dbfs: float, rate: int = RATE) -> np.ndarray:
    """A sine whose RMS is ``dbfs`` (the codecs' convention: sine at L dBFS has rms 10^(L/20))."""
    t = np.arange(int(seconds * rate)) / rate
    return (np.sqrt(2) * 10 ** (dbfs / 20) * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def chirp(f0: float, f1: float, seconds: float, dbfs: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds))
    return (np.sqrt(2) * 10 ** (dbfs / 20) * np.sin(phase)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def rms_db(x: np.ndarray) -> float:
    return float(20 * np.log10(max(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))), 1e-9)))


def band_db(x: np.ndarray, hz: float, rate: int = RATE, width: float = 20.0) -> float:
    """Level (dB rel. full-scale sine rms convention) of the part of ``x`` within ±width of hz."""
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    band = np.abs(freqs - hz) <= width
    power = np.sum(np.abs(spectrum[band]) ** 2) * 2 / len(x) ** 2
    return float(10 * np.log10(max(power, 1e-18)))


def delay_of(reference: np.ndarray, recording: np.ndarray) -> tuple[int, float]:
    """Lag (samples) of ``reference`` inside ``recording`` by FFT cross-correlation, and the
    correlation coefficient there (1.0: an exact, clean copy; glitches and noise lower it)."""
    n = len(recording) + len(reference)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(recording, size) * np.conj(np.fft.rfft(reference, size)), size)
    lag = int(np.argmax(np.abs(corr[: len(recording)])))
    segment = recording[lag : lag + len(reference)].astype(np.float64)
    ref = reference[: len(segment)].astype(np.float64)
    norms = np.linalg.norm(segment) * np.linalg.norm(ref)
    coefficient = float(np.dot(segment, ref) / max(norms, 1e-12))
    return lag, coefficient


def steady_db(x: np.ndarray, step: int = RATE // 100) -> float:
    """Median 10 ms RMS level: the level of a steady tone, not fooled by a rare dropout."""
    blocks = x[: len(x) - len(x) % step].reshape(-1, step)
    return float(np.median(20 * np.log10(np.maximum(np.sqrt(np.mean(np.square(
        blocks, dtype=np.float64), axis=1)), 1e-9))))  # fmt: skip
