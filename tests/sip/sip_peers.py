"""Real SIP peers on 127.0.0.1 for the SIP suite: kamailio (registrar) and baresip (phones).

Every process is started here on free ports, checked to be answering before a
test uses it, and stopped by its PID at the end. In CI a missing binary is a
failure (``require_binary``), never a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from gateway.codecs.pcm import int16_to_float

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.endpoints import ENDPOINTS
from tests import waiting
from tests.conftest import free_port, require_binary, write_wav

HERE = Path(__file__).parent
PASSWORD = "s3cret"


def sip_ping(port: int, timeout: float = 0.3, host: str = "127.0.0.1") -> bool:
    """True when something answers a SIP OPTIONS on host:port (loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        me = s.getsockname()[1]
        s.sendto(
            (
                f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bKping{time.monotonic_ns()}\r\n"
                "Max-Forwards: 70\r\nFrom: <sip:ping@127.0.0.1>;tag=p\r\n"
                f"To: <sip:{host}:{port}>\r\nCall-ID: ping{time.monotonic_ns()}@127.0.0.1\r\n"
                "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            ).encode(),
            (host, port),
        )
        try:
            return s.recv(4096).startswith(b"SIP/2.0")
        except OSError:
            return False


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a process we started (and its own process group) by PID."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


# --- kamailio ----------------------------------------------------------------------------


class Kamailio:
    """A registrar on 127.0.0.1 with digest auth (password ``PASSWORD`` for every user).

    With ``tls`` (its certificate, key and the CA it trusts) it also listens for SIP
    over TLS on ``tls_port`` and connects out over TLS presenting that certificate,
    verifying the far end against the CA.
    """

    def __init__(
        self,
        directory: Path,
        host: str = "127.0.0.1",
        tls: tuple[Path, Path, Path] | None = None,
        template: Path = HERE / "kamailio.cfg.in",
        values: dict[str, str] | None = None,
    ) -> None:
        """``template`` is another cfg (e.g. a dispatcher in front of gateways); ``values``
        fills its ``@NAME@`` placeholders besides ``@PORT@`` and ``@PASSWORD@``."""
        self.binary = require_binary("kamailio")
        self.directory = directory
        self.host = host  # another loopback address (127.0.0.2) tells it apart from phones
        self.port = free_port()
        self.tls_port = 0
        self.proc: subprocess.Popen | None = None
        cfg = template.read_text()
        cfg = cfg.replace("@PORT@", str(self.port)).replace("@PASSWORD@", PASSWORD)
        for name, value in (values or {}).items():
            cfg = cfg.replace(f"@{name}@", value)
        cfg = cfg.replace("127.0.0.1:", f"{host}:")
        if tls is not None:
            self.tls_port = free_port()
            certificate, key, ca = tls
            (directory / "kamailio-tls.cfg").write_text(
                "\n".join(
                    [
                        "[server:default]",
                        "method = TLSv1.2+",
                        "verify_certificate = yes",
                        "require_certificate = no",
                        f"certificate = {certificate}",
                        f"private_key = {key}",
                        f"ca_list = {ca}",
                        "[client:default]",
                        "method = TLSv1.2+",
                        "verify_certificate = yes",
                        "require_certificate = yes",
                        f"certificate = {certificate}",
                        f"private_key = {key}",
                        f"ca_list = {ca}",
                        "",
                    ]
                )
            )
            cfg = cfg.replace(
                "disable_tcp=yes",
                f"enable_tls=yes\nlisten=tls:{host}:{self.tls_port}\n"
                f'alias="{host}:{self.tls_port}"',
            ).replace(
                'loadmodule "tm.so"',
                f'loadmodule "tls.so"\nmodparam("tls", "config", '
                f'"{directory / "kamailio-tls.cfg"}")\nloadmodule "tm.so"',
            )
        self.cfg = directory / "kamailio.cfg"
        self.cfg.write_text(cfg)

    def start(self) -> None:
        log = open(self.directory / "kamailio.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                self.binary,
                "-f",
                str(self.cfg),
                "-DD",
                "-E",
                "-m",
                "32",
                "-M",
                "4",
                "-Y",
                str(self.directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        waiting.wait_for(
            lambda: sip_ping(self.port, host=self.host) or self.proc.poll() is not None,
            15,
            "kamailio",
        )
        if self.proc.poll() is not None:
            raise AssertionError(
                f"kamailio exited: {(self.directory / 'kamailio.log').read_text()}"
            )

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def log_tail(self, size: int = 2000) -> str:
        """The end of kamailio's log, for a test's failure message."""
        log = self.directory / "kamailio.log"
        return log.read_text(errors="replace")[-size:] if log.exists() else "(no log)"


# --- baresip -----------------------------------------------------------------------------


def _readable_wav(path: Path) -> bool:
    try:
        with wave.open(str(path), "rb"):
            return True
    except (wave.Error, EOFError):
        return False


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return int16_to_float(data[:: w.getnchannels()]), w.getframerate()


def tone(hz: float, seconds: float, rate: int = 8000, level: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


class Phone:
    """A baresip phone on 127.0.0.1 playing a WAV as its microphone and recording what it hears."""

    def __init__(
        self,
        directory: Path,
        name: str,
        source: np.ndarray,
        codec: str = "PCMU",
        registrar_port: int | None = None,
        rtcp_mux: bool = False,
        password: str = "",
        registrar_host: str = "127.0.0.1",
        transport: str = "udp",
        cafile: Path | None = None,
        certificate: Path | None = None,
    ) -> None:
        """``transport`` "tcp"/"tls" for SIP over a stream (TLS: ``cafile`` verifies the
        far end, ``certificate`` is a PEM with the phone's certificate and key)."""
        self.binary = require_binary("baresip")
        self.name = name
        self.dir = directory / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records = self.dir / "rec"
        self.records.mkdir(exist_ok=True)
        self.port = self._even_free_pair()
        self.console = free_port()
        self.source = write_wav(self.dir / "source.wav", source, 8000)
        (self.dir / "config").write_text(
            "\n".join(
                [
                    "poll_method epoll",
                    f"sip_listen 127.0.0.1:{self.port}",
                    "net_interface 127.0.0.1",
                    "dns_server 127.0.0.1:53",
                    f"audio_source aufile,{self.source}",
                    "audio_player alsa,null",
                    "audio_alert aufile,/dev/null",
                    "module_path /usr/lib/baresip/modules",
                    "module g711.so",
                    "module aufile.so",
                    "module alsa.so",
                    "module sndfile.so",
                    "module rtcpsummary.so",  # prints what our RTCP reports told it
                    "module account.so",
                    "module menu.so",
                    "module cons.so",
                    f"cons_listen 127.0.0.1:{self.console}",
                    f"snd_path {self.records}",
                    "rtp_timeout 0",
                    f"rtcp_mux {'yes' if rtcp_mux else 'no'}",
                    *([f"sip_cafile {cafile}"] if cafile else []),
                    *([f"sip_certificate {certificate}"] if certificate else []),
                    "",
                ]
            )
        )
        domain = (
            f"{registrar_host}:{registrar_port}" if registrar_port else f"127.0.0.1:{self.port}"
        )
        # auth_pass: what baresip answers a 401/407 challenge with (user = the AOR's user).
        auth = f";auth_pass={password}" if password else ""
        (self.dir / "accounts").write_text(
            f"<sip:{name}@{domain};transport={transport}>{auth};regint=0;audio_codecs={codec};"
            "answermode=auto\n"
        )
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "baresip.log"

    @staticmethod
    def _even_free_pair() -> int:
        """baresip also binds sip_listen + 1: pick a port whose neighbour is free too."""
        return free_port(pair=True)

    @property
    def uri(self) -> str:
        return f"sip:{self.name}@127.0.0.1:{self.port}"

    def start(self, dial: str | None = None, seconds: float = 10.0, verbose: bool = False) -> None:
        args = [
            self.binary,
            "-f",
            str(self.dir),
            "-t",
            str(int(seconds)),
            *(["-v"] if verbose else []),
        ]
        if dial:
            args += ["-e", f"/dial {dial}"]
        out = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()

    def key(self, keys: str) -> None:
        """Press keys on the phone (digits in a call are sent as RFC 4733 DTMF)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for k in keys:
                s.sendto(k.encode(), ("127.0.0.1", self.console))

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def heard(self, call: int = -1) -> np.ndarray:
        """What the phone received in a call (baresip's sndfile '-dec' recording)."""
        files = sorted(self.records.glob("*dec*.wav"))
        assert files, f"{self.name} recorded nothing: {self.output()[-2000:]}"
        # baresip finishes the WAV when the call is torn down, a moment after the BYE
        # shows in its output: wait until the header reads.
        waiting.wait_for(lambda: _readable_wav(files[call]), 5, f"{self.name}'s recording to close")
        return read_wav(files[call])[0]

    def sent(self) -> np.ndarray:
        files = sorted(self.records.glob("*enc*.wav"))
        assert files, f"{self.name} recorded nothing it sent: {self.output()[-2000:]}"
        return read_wav(files[-1])[0]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=3)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# --- the gateway under test ----------------------------------------------------------


@contextlib.asynccontextmanager
async def running_gateway(toml: str, endpoints: tuple = ENDPOINTS) -> AsyncIterator[Gateway]:
    """The real Gateway (engine, clock, SIP service) on this event loop."""
    gateway = Gateway(parse_config(toml, endpoints=endpoints))
    task = asyncio.ensure_future(gateway.run())
    try:

        def started() -> bool:
            sip = getattr(gateway, "sip", None)
            return task.done() or (sip is not None and sip.calls is not None)

        await waiting.until(started, 5, "the SIP service to start")
        if task.done():
            task.result()
        yield gateway
    finally:
        gateway.stop()
        await asyncio.wait_for(task, 10)


def run(coro) -> None:
    from gateway.site import run_async

    run_async(coro)


# --- audio checks ---------------------------------------------------------------------


def band_db(x: np.ndarray, rate: int, hz: float, width: float = 40.0) -> float:
    """Level (dBFS, RMS-equivalent) of the part of ``x`` within ±width of ``hz``."""
    if len(x) == 0:
        return -120.0
    spectrum = np.fft.rfft(x * np.hanning(len(x)))
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    power = np.abs(spectrum) ** 2
    band = power[(freqs > hz - width) & (freqs < hz + width)].sum()
    norm = (np.hanning(len(x)) ** 2).sum() / 2
    return float(10 * np.log10(max(band / norm / len(x), 1e-12)))


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    spectrum[freqs < 100] = 0
    return float(freqs[int(np.argmax(spectrum))])
