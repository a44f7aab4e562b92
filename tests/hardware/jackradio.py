"""A real audio path for radio tests: a uniquely named JACK server (dummy backend) and a
simulator that plays the radios — it feeds known audio into each radio port's capture
side and records what the gateway sends to its playback side, sample-locked to its
stream's frame counter so delays can be measured by cross-correlation.

jackd must be up before PortAudio scans devices, so the server is started (and
PortAudio re-initialised if something imported sounddevice earlier) before any
stream opens. The server is stopped by PID at the end.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
from gateway.hardware.card_process import lock_memory
from gateway.hardware.ring import SharedRing

from tests import waiting
from tests.conftest import require_binary

RATE = 48000
PERIOD = 256
SYSTEM_PORTS = 4  # the radio simulator is one stream with a channel per radio (up to this many)
PASS_THROUGH = "PortAudio"  # the JACK client of a stream opened in a test's own process


def card_client(port: str) -> str:
    """The JACK client of a radio port's sound card (each card streams in its own process)."""
    from gateway.hardware.card_process import jack_client_name

    return jack_client_name(port)


# No condition is given up on sooner: on a shared 2-core machine at load 15 (stress-ng
# beside eight test suites) a gateway takes over 5 s to tick and a Python process over
# 20 s to start and report. A wait is a bound on a hang, never on speed.
LEAST_WAIT_S = 30.0


def jackd_log(name: str) -> Path:
    """Where ``start_jackd(name)`` keeps the server's messages (its xrun reports name
    the client that was late): a file, since a pipe nobody reads fills and then blocks
    the server's message thread."""
    return Path(tempfile.gettempdir()) / f"borderlink-jackd-{name}.log"


def start_jackd(name: str, rate: int = RATE, period: int = PERIOD) -> subprocess.Popen:
    jackd = require_binary("jackd")
    env = {**os.environ, "JACK_NO_AUDIO_RESERVATION": "1"}
    for realtime in (["-R"], ["--no-realtime"]):
        with jackd_log(name).open("wb") as log:
            proc = subprocess.Popen(
                [
                    jackd,
                    "-n",
                    name,
                    *realtime,
                    "-d",
                    "dummy",
                    "-r",
                    str(rate),
                    "-p",
                    str(period),
                    "-C",
                    str(SYSTEM_PORTS),
                    "-P",
                    str(SYSTEM_PORTS),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        lsp_env = {**os.environ, "JACK_DEFAULT_SERVER": name}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            out = subprocess.run(["jack_lsp"], env=lsp_env, capture_output=True, text=True)
            if "system:playback_1" in out.stdout:
                return proc
            time.sleep(0.05)
        stop_jackd(proc)
        errors = jackd_log(name).read_text(errors="replace")[-600:]
    raise RuntimeError(f"jackd -n {name} did not start: {errors}")


@contextmanager
def own_jackd(name: str, period: int, back_to: str | None = None) -> Iterator[str]:
    """A JACK dummy server of its own (another period than the session's), with this
    process's PortAudio on it; afterwards PortAudio goes back to ``back_to`` (None: to its
    default) and the server stops."""
    jackd = start_jackd(name, period=period)
    try:
        portaudio_on(name)
        yield name
    finally:
        if back_to:
            portaudio_on(back_to)
        else:
            portaudio_off()
        stop_jackd(jackd)


def stop_jackd(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # A server stopped under its clients (as the vanished-server tests do) leaves their
    # semaphores in /dev/shm, and one killed leaves its own segment (jack_NAME_0_0):
    # remove what belonged to this server name, nothing else.
    name = proc.args[proc.args.index("-n") + 1]
    shm = Path("/dev/shm")
    for left in [*shm.glob(f"jack_sem.*_{name}_*"), *shm.glob(f"jack_{name}_*")]:
        left.unlink(missing_ok=True)


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

    It is a sound card itself: a PortAudio stream on the JACK server, served by the
    gateway's own C callback (one lane per radio: ``speaker`` = its output channel,
    ``mic`` = its input channel), in a process of its own. A thread there keeps each
    radio's playback ring a few periods ahead of the stream with the signal due at
    those frames, and drains the capture rings into the recording. Nothing in Python
    runs on the audio server's deadline, so an xrun the bench counts is the gateway's.
    The recording and the frame counter are in shared memory; commands (play,
    connect) go over a pipe.
    """

    def __init__(self, server: str, radios: int, seconds: float = 20.0) -> None:
        size = int(seconds * RATE)
        self.radios, self.size = radios, size
        self._shm = shared_memory.SharedMemory(create=True, size=(radios * size + 2) * 4 + 16)
        self._counter = np.ndarray(2, np.int64, self._shm.buf)  # frames recorded, underruns
        self._record = np.ndarray((radios, size), np.float32, self._shm.buf, offset=16)
        self._record.fill(0.0)  # every page mapped now
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_sim_main, args=(server, radios, size, self._shm.name, child), daemon=True
        )
        self._proc.start()
        child.close()
        if not self._pipe.poll(20):
            self.close()
            raise RuntimeError(f"the radio simulator did not start on JACK server {server}")
        answer = self._pipe.recv()
        if isinstance(answer, Exception):
            self.close()
            raise answer
        self.rate, self.blocksize = answer

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
        """Frames recorded on every radio since the stream started."""
        return int(self._counter[0])

    @property
    def underruns(self) -> int:
        """Times a radio's playback ring ran dry (its feeder starved): the harness's loss,
        silence for a while where the signal was due; the rest of the signal stays on time."""
        return int(self._counter[1])

    def connect(self, radio: int, client: str, timeout: float = LEAST_WAIT_S) -> None:
        """Wire radio ``radio`` to a sound card's JACK ``client`` (in_0 / out_0), once it
        shows up (a card's process may still be starting)."""
        self._ask("connect", radio, client, timeout, timeout=timeout + 5)

    def start(self, radio: int, signal: np.ndarray, delay: float = 0.0, loop: bool = False) -> int:
        """Play ``signal`` into the radio's receiver; returns the frame it starts at."""
        return self._ask("start", radio, signal.astype(np.float32), delay, loop)

    def silence(self, radio: int) -> None:
        self._ask("silence", radio)

    def stall(self, seconds: float) -> None:
        """Hold the feeder thread for ``seconds``, as a starved machine would (tests of the
        simulator itself)."""
        self._ask("stall", seconds)

    def loop_back(self, radio: int) -> None:
        """Wire the radio's speaker to its own mic (tests of the simulator itself)."""
        self._ask("loop_back", radio)

    def monotonic_at(self, frame: int) -> float:
        """When (time.monotonic) the stream's cycle holding ``frame`` was processed."""
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


LEAD_PERIODS = 6  # the playback rings are kept this far ahead of the stream (32 ms)
FEED_S = 0.001


class _SimStream:
    """The simulator's stream and its feeder thread, in its own process (see :class:`RadioSim`)."""

    def __init__(self, server: str, radios: int, size: int, shm: shared_memory.SharedMemory):
        import jack
        import sounddevice as sd
        from gateway.hardware import card_process as cp
        from gateway.hardware.devices import find_card, sound_cards

        os.environ["JACK_DEFAULT_SERVER"] = server
        self.name = f"radiosim{os.getpid()}"
        cp.name_jack_client(sd, self.name)
        self.control = jack.Client(f"{self.name}-wiring", no_start_server=True)
        card = find_card("system", "JACK", radios, radios, sound_cards())
        self.radios, self.size = radios, size
        self.counter = np.ndarray(2, np.int64, shm.buf)
        self.record = np.ndarray((radios, size), np.float32, shm.buf, offset=16)
        self.status = np.zeros(cp.COUNTERS, np.int64)
        self.clock = np.zeros(1, np.float64)
        ring_bytes = SharedRing.nbytes(1 << 16)
        self._memory = bytearray(2 * radios * ring_bytes)
        view = memoryview(self._memory)
        self.rx = [SharedRing(view, 1 << 16, 2 * i * ring_bytes) for i in range(radios)]
        self.tx = [SharedRing(view, 1 << 16, (2 * i + 1) * ring_bytes) for i in range(radios)]
        self.lane_status = np.zeros((radios, cp.COUNTERS), np.int64)
        lanes = [
            cp.Lane.between(self.rx[i], self.tx[i], self.lane_status[i], i, i)
            for i in range(radios)
        ]
        self.callback = cp.StreamCallback(self.status, self.clock, radios, radios, lanes)
        self.rate = self.control.samplerate
        self.blocksize = self.control.blocksize
        self.play = [np.zeros(0, np.float32) for _ in range(radios)]
        self.play_at = [0] * radios
        self.loop = [False] * radios
        # Stream frames each radio's playback ring ran dry for (played as silence): ring
        # position + dry == stream frame, so a starved feeder loses those frames of the
        # signal but never shifts the rest of it against the frame count tests use as time.
        self.dry = [0] * radios
        self.stamps: list[tuple[int, float]] = []  # (first frame of a cycle, monotonic time)
        self.lock = threading.Lock()
        self.running = True
        self.held_until = 0.0  # monotonic time the feeder is held till (stall)
        for ring in self.tx:  # primed with silence: ring position == stream frame from here on
            ring.push(np.zeros(LEAD_PERIODS * self.blocksize, np.float32))
        self.stream = cp.open_stream(
            sd, card.index, self.rate, radios, radios, 0, "low", self.callback, lambda: None
        )
        self.feeder = threading.Thread(target=self._feed, daemon=True, name="sim feeder")
        self.feeder.start()

    def _feed(self) -> None:
        """Playback rings a lead ahead of the stream; capture rings into the recording."""
        from gateway.hardware.card_process import TX_UNDERRUNS, stamp

        lead = LEAD_PERIODS * self.blocksize
        while self.running:
            if time.monotonic() < self.held_until:
                time.sleep(FEED_S)
                continue
            with self.lock:
                # The stream's frame count first: a ring read after it is no older. The
                # callback moves a ring's read position before the count, so mid-call this
                # under-reads the dry frames (never over): the largest value seen is right.
                total = self.frame_now()
                for i, ring in enumerate(self.tx):
                    self.dry[i] = max(self.dry[i], total - int(ring.counters[1]))
                    want = lead - ring.level
                    if want > 0:  # ring position + dry == stream frame: render from there
                        ring.push(self._render(i, int(ring.counters[0]) + self.dry[i], want))
            recorded = []
            for i, ring in enumerate(self.rx):
                at = int(ring.counters[1])
                n = min(ring.level, max(0, self.size - at))
                got = ring.pop_into(self.record[i, at : at + n]) if n else 0
                if at + got >= self.size:
                    ring.pop_all()  # past the end of the recording: dropped
                recorded.append(at + got)
            self.counter[1] = int(self.lane_status[:, TX_UNDERRUNS].sum())
            self.counter[0] = min(recorded)  # after the samples: never unwritten audio
            frame, when = stamp(self.status, self.clock)
            if (
                when
                and (not self.stamps or self.stamps[-1][0] != frame)
                and len(self.stamps) < 200000
            ):
                self.stamps.append((frame, when))
            time.sleep(FEED_S)

    def _render(self, radio: int, start: int, frames: int) -> np.ndarray:
        """The radio's signal for stream frames [start, start + frames)."""
        buf = np.zeros(frames, np.float32)
        sig, at, loop = self.play[radio], self.play_at[radio], self.loop[radio]
        if len(sig):
            first = max(at, start)  # first frame of this span that plays the signal
            offset = first - at
            while first < start + frames and (loop or offset < len(sig)):
                if loop:
                    offset %= len(sig)
                n = min(start + frames - first, len(sig) - offset)
                buf[first - start : first - start + n] = sig[offset : offset + n]
                first, offset = first + n, offset + n
        return buf

    def connect(self, radio: int, client: str, timeout: float) -> None:
        c = self.control
        mic, speaker = f"{client}:in_0", f"{client}:out_0"
        ours_out, ours_in = f"{self.name}:out_{radio}", f"{self.name}:in_{radio}"
        waiting.wait_for(
            lambda: c.get_ports(f"^{client}:in_0$") and c.get_ports(f"^{client}:out_0$"),
            timeout,
            f"JACK client {client}",
        )
        for port in c.get_all_connections(mic):
            c.disconnect(port, mic)
        for port in c.get_all_connections(speaker):
            c.disconnect(speaker, port)
        for port in c.get_all_connections(ours_out):  # PortAudio wired us to the system ports
            c.disconnect(ours_out, port)
        for port in c.get_all_connections(ours_in):
            c.disconnect(port, ours_in)
        c.connect(ours_out, mic)
        c.connect(speaker, ours_in)

    def start(self, radio: int, signal: np.ndarray, delay: float, loop: bool) -> int:
        with self.lock:  # the feeder renders from frame tx.written on: start no sooner
            at = max(
                int(self.tx[radio].counters[0]) + self.dry[radio],
                self.frame_now() + int(delay * self.rate) + 2 * self.blocksize,
            )
            self.play[radio], self.play_at[radio], self.loop[radio] = signal, at, loop
        return at

    def stall(self, seconds: float) -> None:
        self.held_until = time.monotonic() + seconds

    def loop_back(self, radio: int) -> None:
        ours_out, ours_in = f"{self.name}:out_{radio}", f"{self.name}:in_{radio}"
        for port in self.control.get_all_connections(ours_out):
            self.control.disconnect(ours_out, port)
        for port in self.control.get_all_connections(ours_in):
            self.control.disconnect(port, ours_in)
        self.control.connect(ours_out, ours_in)

    def frame_now(self) -> int:
        from gateway.hardware.card_process import TOTAL

        return int(self.status[TOTAL])

    def silence(self, radio: int) -> None:
        with self.lock:
            self.play[radio] = np.zeros(0, np.float32)

    def monotonic_at(self, frame: int) -> float:
        starts = np.array([s[0] for s in self.stamps])
        i = max(0, int(np.searchsorted(starts, frame, side="right")) - 1)
        first, when = self.stamps[i]
        # cycles the feeder did not see stamped are a whole number of periods later
        cycles = max(0, frame - first) // self.blocksize
        return when + cycles * self.blocksize / self.rate

    def close(self) -> None:
        self.running = False
        self.feeder.join(2)
        self.stream.abort(ignore_errors=True)
        self.stream.close(ignore_errors=True)
        self.control.close()


def _sim_main(server: str, radios: int, size: int, shm_name: str, pipe) -> None:
    lock_memory()  # a page fault on evicted memory in the callback would be an xrun
    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        sim = _SimStream(server, radios, size, shm)
    except Exception as exc:  # the test sees why, not a timeout
        pipe.send(exc)
        return
    pipe.send((sim.rate, sim.blocksize))
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
    return float(
        np.median(
            20
            * np.log10(
                np.maximum(np.sqrt(np.mean(np.square(blocks, dtype=np.float64), axis=1)), 1e-9)
            )
        )
    )


BLOCK = RATE // 100  # a steady tone is judged in 10 ms blocks (ten cycles of 1 kHz)


def block_db(x: np.ndarray, step: int = BLOCK) -> np.ndarray:
    """RMS level of each whole ``step``-sample block of ``x`` (dBFS)."""
    blocks = x[: len(x) - len(x) % step].reshape(-1, step)
    rms = np.sqrt(np.mean(np.square(blocks, dtype=np.float64), axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-9))


def block_hz(block: np.ndarray, rate: int = RATE) -> float | None:
    """A tone's frequency in one block: rising zero crossings, placed between samples by
    linear interpolation, counted over the time they span (None: fewer than two)."""
    x = block.astype(np.float64)
    i = np.flatnonzero((x[:-1] < 0) & (x[1:] >= 0))
    if len(i) < 2:
        return None
    at = i + x[i] / (x[i] - x[i + 1])  # where the line between the two samples crosses 0
    return float((len(at) - 1) * rate / (at[-1] - at[0]))


def tone_gaps(x: np.ndarray, hz: float, dbfs: float, losses: int) -> None:
    """``x`` is a steady tone at ``hz`` and ``dbfs`` except where a loss the gateway
    counted left a gap.

    What the design guarantees on a starved machine (a normal-priority gateway beside
    stress-ng and other suites, where ticks come 30–100 ms late and some are skipped):
    a FIFO that runs dry is counted (an underrun) and refilled with silence, so each gap
    in the audio is at least one counted loss; the audio that does pass is the tone,
    neither bent in pitch beyond the drift control's ±500 ppm nor changed in level.
    Whole blocks (loud, and so are both neighbours) are judged: their median level
    within 1 dB, their median frequency within 3 Hz; every run of quiet blocks is a gap,
    and there may be no more gaps than ``losses``. A radio that stays silent, or goes
    silent with nothing counted, fails."""
    db = block_db(x)
    loud = db > dbfs - 20
    assert loud.any(), "no audio"
    gaps = int(np.sum(loud[:-1] & ~loud[1:]) + (not loud[0]))  # runs of quiet blocks
    assert gaps <= losses, f"{gaps} gaps in the tone but {losses} losses counted"
    whole = loud & np.roll(loud, 1) & np.roll(loud, -1)
    whole[[0, -1]] = False
    assert whole.sum() >= 5, f"only {int(whole.sum())} whole 10 ms blocks of tone"
    level = float(np.median(db[whole]))
    assert abs(level - dbfs) < 1.0, f"tone level {level:.2f} dBFS"
    found = [block_hz(x[k * BLOCK : (k + 1) * BLOCK]) for k in np.flatnonzero(whole)]
    pitch = float(np.median([f for f in found if f is not None]))
    assert abs(pitch - hz) < 3, f"tone at {pitch:.1f} Hz"
