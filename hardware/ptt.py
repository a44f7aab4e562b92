"""PTT in the gateway: what the engine wants, handed to the PTT guardian process.

The engine decides *when* a radio should transmit (its mix is audible, plus the
port's ``ptt_hang_time``). The lines themselves are driven by the PTT guardian
(:mod:`.guardian`), a tiny process of its own, so that a gateway that dies hard
or hangs cannot leave a transmitter keyed. This module is the gateway's end:

- the ticks that feed a transmitter (:meth:`PttController.fed`) tell the guardian
  "still on" — the heartbeat, every :data:`HEARTBEAT_EVERY_S` (not every tick: each
  message wakes the guardian, and four can go missing before it acts); when the ticks
  stop (the engine is hung, the process is stopped or dead), the guardian drops the
  line within its heartbeat timeout;
- key/unkey, "release after the queued audio", inhibit (sound card lost) are
  messages the guardian acknowledges, so :attr:`PttController.keyed` is what the
  line really is; the transmit TOT, the device's loss and return are reported back;
- if the guardian itself dies, every line is down (it unkeys as it goes, or its
  lines were never keyed); a new one is started and the lines reopened;
- an ``atexit`` hook (and SIGTERM turned into a normal exit when nobody else
  handles it) unkeys every live transmitter before the process ends, so an orderly
  exit leaves the lines unkeyed at once, not a heartbeat timeout later.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from .guardian import (
    HEARTBEAT_TIMEOUT_S,
    Cm108Keyer,
    GpioKeyer,
    Keyer,
    SerialKeyer,
    keyer_from_spec,
    unkey,
)
from .lines import LineError

log = logging.getLogger(__name__)

GUARDIAN_SCRIPT = Path(__file__).with_name("guardian.py")
START_TIMEOUT_S = 20.0  # a new Python process on a loaded machine
ACK_TIMEOUT_S = 1.0  # the guardian answers in well under a millisecond when it runs
RESTART_S = 0.5  # a guardian that died is replaced after this
HEARTBEAT_EVERY_S = HEARTBEAT_TIMEOUT_S / 5  # 50 ms: about every third tick


class GuardianProcess:
    """The gateway's end of one PTT guardian process, shared by every PTT line."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env  # the guardian's environment (None: the gateway's)
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen | None = None
        self.hello: dict[str, Any] = {}
        self.lines: dict[str, PttController] = {}
        self.acked: dict[str, int] = {}
        self.restarts = 0
        self.closing = False
        self._cond = threading.Condition()
        self._start_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def timeout(self) -> float:
        """The guardian's heartbeat timeout, as it says itself."""
        return float(self.hello.get("timeout", HEARTBEAT_TIMEOUT_S))

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # python -S: no site (an editable install's import hook alone costs 3 MB); the
        # guardian finds pyserial and gpiod on the gateway's own path instead.
        env = {
            **(os.environ if self.env is None else self.env),
            "BORDERLINK_GUARDIAN_PATH": os.pathsep.join(p for p in sys.path if p),
        }
        try:
            proc = subprocess.Popen(
                [sys.executable, "-S", str(GUARDIAN_SCRIPT), "--fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's ^C is the gateway's to handle
            )
        finally:
            theirs.close()
        ours.settimeout(START_TIMEOUT_S)
        try:
            hello = json.loads(ours.recv(65536) or b"{}")
        except (OSError, ValueError):
            hello = {}
        if hello.get("op") != "hello":
            proc.kill()
            proc.wait()
            ours.close()
            raise RuntimeError(f"the PTT guardian ({GUARDIAN_SCRIPT}) did not start")
        ours.settimeout(None)
        _stay_killable()
        log.info(
            "PTT guardian running (pid %d, %s, heartbeat timeout %.0f ms)",
            proc.pid,
            hello.get("priority"),
            hello["timeout"] * 1000,
        )
        with self._cond:
            self.sock, self.proc, self.hello = ours, proc, hello
        threading.Thread(
            target=self._read, args=(ours, proc), name="ptt-guardian", daemon=True
        ).start()

    def close(self) -> None:
        """Stop the guardian (it unkeys whatever it still holds)."""
        with self._cond:
            self.closing = True
            sock, proc = self.sock, self.proc
            self.sock = None
            self._cond.notify_all()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # --- lines ---

    def add(self, controller: PttController) -> str:
        with self._start_lock:
            if self.sock is None and not self.closing:
                self.start()
        with self._cond:
            key = str(next(self._ids))
            self.lines[key] = controller
        self.send(key, _open_message(controller), wait=True)
        return key

    def remove(self, key: str) -> None:
        self.send(key, {"op": "close"}, wait=True)
        with self._cond:
            self.lines.pop(key, None)
            self.acked.pop(key, None)

    def send(self, key: str, msg: dict[str, Any], wait: bool = False) -> None:
        """Send a message about line ``key``; ``wait``: until the guardian has applied it."""
        with self._cond:
            sock = self.sock
            seq = next(self._seq) if wait else 0
        if sock is None:
            return
        try:
            sock.send(json.dumps({**msg, "id": key, "seq": seq}).encode(), socket.MSG_DONTWAIT)
        except BlockingIOError:  # the guardian is not reading; its timers still run
            return
        except OSError:  # it died: the reader starts another
            return
        if wait:
            with self._cond:
                done = self._cond.wait_for(
                    lambda: self.acked.get(key, 0) >= seq or self.sock is not sock, ACK_TIMEOUT_S
                )
            if not done:
                log.warning("PTT guardian did not answer within %.1fs", ACK_TIMEOUT_S)

    # --- inside ---

    def _read(self, sock: socket.socket, proc: subprocess.Popen) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            msg = json.loads(data)
            key = str(msg.get("id"))
            with self._cond:
                controller = self.lines.get(key)
                if controller is not None and msg.get("op") == "state":
                    controller._report(msg)
                self.acked[key] = max(self.acked.get(key, 0), int(msg.get("ack") or 0))
                self._cond.notify_all()
        self._gone(sock, proc)

    def _gone(self, sock: socket.socket, proc: subprocess.Popen) -> None:
        """The guardian's end closed: every line it held is down; start another."""
        with self._cond:
            if self.sock is sock:
                self.sock = None
            for controller in self.lines.values():
                controller._lost_guardian()
            self._cond.notify_all()
            if self.closing:
                return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        log.error(
            "PTT guardian (pid %d) exited (%s): its lines are unkeyed; starting another",
            proc.pid,
            proc.returncode,
        )
        while True:
            time.sleep(RESTART_S)
            with self._start_lock:
                if self.closing:
                    return
                try:
                    if self.sock is None:
                        self.start()
                except (OSError, RuntimeError) as exc:
                    log.error("PTT guardian restart failed: %s", exc)
                    continue
            with self._cond:
                self.restarts += 1
                lines = list(self.lines.items())
            for key, controller in lines:  # reopened as they were; keyed when the engine asks
                self.send(key, _open_message(controller))
            return


def _stay_killable() -> None:
    """A service's ``OOMScoreAdjust=-1000`` is there for the guardian (it inherits it): the
    gateway itself goes back to 0, so the OOM killer takes it, never the guardian."""
    path = "/proc/self/oom_score_adj"
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            if int(f.read()) > -1000:
                return
        with open(path, "w") as f:
            f.write("0")
        log.info("oom_score_adj -1000 left to the PTT guardian; the gateway's is back to 0")


def _open_message(controller: PttController) -> dict[str, Any]:
    return {
        "op": "open",
        "name": controller.name,
        "keyer": controller.keyer.spec(),
        "tot": controller.tot,
    }


_SHARED: GuardianProcess | None = None
_SHARED_LOCK = threading.Lock()


def shared_guardian() -> GuardianProcess:
    """The process's one guardian, started with the first PTT line."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = GuardianProcess()
        return _SHARED


_LIVE: weakref.WeakSet[PttController] = weakref.WeakSet()
_HOOKED = False


def release_all() -> None:
    """Unkey every live transmitter now (atexit, fatal errors)."""
    for controller in list(_LIVE):
        controller.force_off("process exit")


def _sigterm_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _install_last_resort() -> None:
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    atexit.register(release_all)
    # The default SIGTERM action kills the process without atexit; make it a normal
    # exit when nobody (the gateway's own loop, say) has claimed the signal.
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _sigterm_exit)
        except ValueError:
            pass


class PttController:
    """One transmitter's PTT: what the engine wants, and what the guardian says the line is.

    ``tot``: transmit time-out (0 = off), run by the guardian; after it trips the line
    stays down until the engine unkeys and keys again. ``guardian``: the process that
    drives the line (default: the one shared by the whole gateway).
    """

    def __init__(
        self, keyer: Keyer, name: str, tot: float = 0.0, guardian: GuardianProcess | None = None
    ) -> None:
        self.keyer, self.name, self.tot = keyer, name, tot
        self.guardian = guardian
        self.key_id = ""
        self.wanted = False
        self.beat_at = -HEARTBEAT_EVERY_S  # time.monotonic() of the last heartbeat sent
        self.inhibited = ""  # why the line must stay down (sound card lost), or ""
        # What the guardian last reported of the line.
        self.line = False
        self.device_up = False
        self.tot_tripped = False
        self.stuck = ""
        self.keyed_at = 0.0
        self.tx_seconds = 0.0
        self.counts = {"ptt_keyups": 0, "tot_trips": 0, "watchdog_trips": 0, "device_errors": 0}
        self._base = dict(self.counts)  # counted by guardians that have gone: counters only grow
        self._tx_base = 0.0

    # --- life -----------------------------------------------------------------

    def open(self) -> None:
        """Hand the line to the guardian (which opens it unkeyed)."""
        _install_last_resort()
        if self.guardian is None:
            self.guardian = shared_guardian()
        self.key_id = self.guardian.add(self)
        _LIVE.add(self)

    def close(self) -> None:
        """Unkey now and release the device; safe to call twice."""
        self.wanted = False
        if self.guardian is not None and self.key_id:
            self.guardian.remove(self.key_id)
        self.key_id = ""
        self.line = self.device_up = False
        _LIVE.discard(self)

    # --- what the port calls -------------------------------------------------

    def key(self, on: bool, release_after: float = 0.0) -> None:
        """Engine says transmit / stop. An unkey waits ``release_after`` (queued audio)."""
        self.wanted = on
        if on:
            if not self.inhibited:
                self._send({"op": "on"}, wait=True)
        else:
            self._send({"op": "off", "after": release_after}, wait=True)

    def fed(self) -> None:
        """The engine handed this transmitter a frame: the heartbeat that keeps it keyed."""
        if self.wanted and not self.inhibited:
            now = time.monotonic()
            if now - self.beat_at >= HEARTBEAT_EVERY_S:
                self.beat_at = now
                self._send({"op": "on"})

    def inhibit(self, why: str) -> None:
        """Hold PTT down whatever the engine wants, until :meth:`allow` (no audio path)."""
        self.inhibited = why
        self._send({"op": "off"}, wait=True)

    def allow(self) -> None:
        """Lift :meth:`inhibit`; keys again if the engine still wants to transmit."""
        self.inhibited = ""
        if self.wanted:
            self._send({"op": "on"}, wait=True)

    def force_off(self, why: str) -> None:
        """Drop PTT now, whatever the engine wants (exit)."""
        self._send({"op": "off"}, wait=True)

    @property
    def keyed(self) -> bool:
        return self.line

    def stats(self) -> dict[str, float]:
        tx = self.tx_seconds + (time.monotonic() - self.keyed_at if self.line else 0.0)
        return {
            **{k: float(v) for k, v in self.counts.items()},
            "tx_seconds": tx,
            "ptt_stuck": float(bool(self.stuck)),
        }

    # --- inside --------------------------------------------------------------

    def _send(self, msg: dict[str, Any], wait: bool = False) -> None:
        if self.guardian is not None and self.key_id:
            self.guardian.send(self.key_id, msg, wait)

    def _report(self, state: dict[str, Any]) -> None:
        """The guardian's word on the line (its reader thread)."""
        self.line = bool(state.get("keyed", False))
        self.device_up = bool(state.get("device_up", False))
        self.tot_tripped = bool(state.get("tot_tripped", self.tot_tripped))
        self.stuck = str(state.get("stuck", self.stuck))
        self.keyed_at = float(state.get("keyed_at", self.keyed_at))
        self.tx_seconds = self._tx_base + float(state.get("tx_seconds", 0.0))
        for name, value in state.get("counts", {}).items():
            self.counts[name] = self._base.get(name, 0) + value

    def _lost_guardian(self) -> None:
        """The guardian died: the line is down (it unkeyed it, or cannot have kept it up)."""
        if self.line:
            self.tx_seconds += time.monotonic() - self.keyed_at
        self.line = self.device_up = False
        self.counts["device_errors"] += 1
        self._base, self._tx_base = dict(self.counts), self.tx_seconds


__all__ = [
    "Cm108Keyer",
    "GpioKeyer",
    "GuardianProcess",
    "Keyer",
    "LineError",
    "PttController",
    "SerialKeyer",
    "keyer_from_spec",
    "release_all",
    "shared_guardian",
    "unkey",
]
