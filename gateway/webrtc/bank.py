"""All consoles' audio in one step per tick (a :class:`~gateway.ports.PortBank`).

A hundred dispatchers monitoring one busy talkgroup is the console's heavy case.
Called one by one, each console port cost a ``read()``, a ``write()``, a frame
comparison and a trip through attribute chains down to the socket: about 80 µs
of Python per listener per frame. The bank instead, once per tick:

* reads only the consoles whose PTT is down (the others have nothing to say);
* finds, per talkgroup, every listener whose mix is bit-identical to the first
  one's in one NumPy comparison, and gives them all the talkgroup's single
  shared Opus packet (as Asterisk's softmix does); a listener that talks (N-1
  mix), hears the busy tone or has another gain gets its own encoder;
* during silence sends a listener one packet every 400 ms instead of one a
  frame (discontinuous transmission, as Opus DTX does): an idle talkgroup with
  a hundred consoles then costs a tenth of a busy one;
* sends every packet in one pass (header, SRTP, ``sendto``; see :mod:`.rtp`),
  and a slice of the consoles' RTCP sender reports, so each gets one a second
  without a timer task per console.

The plan (which ports share which encode) is cached per engine layout, so a
tick does no per-port dictionary work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.ports import Port, PortBank
from gateway.webrtc.audio import SharedEncoders
from gateway.webrtc.rtp import REPORT_SECONDS

DTX_SECONDS = 0.4  # during silence, one packet this often (as Opus DTX does)
DTX_HANGOVER = 5  # frames of silence still sent after audio, before the pauses

if TYPE_CHECKING:
    from gateway.webrtc.port import ConsolePort


class _Plan:
    """Which rows of the bank share which talkgroup's encode (one engine layout)."""

    def __init__(self, ports: list[ConsolePort], old: _Plan | None) -> None:
        self.ports = ports
        # Ticks of silence per seat, carried over a layout change; seats that may
        # pause (DTX) are those sending through our own RTP (aiortc's sender cannot).
        quiet: dict[int, int] = {}
        if old is not None:
            quiet = {id(p): int(q) for p, q in zip(old.ports, old.quiet, strict=True)}
        self.quiet = np.array([quiet.get(id(p), 0) for p in ports], np.int64)
        self.dtx = np.array([p.dtx and p.direct is not None for p in ports], bool)
        self.phase = np.arange(len(ports), dtype=np.int64)  # spreads keep-alives over ticks
        groups: dict[tuple[str, str], list[int]] = {}  # (talkgroup, side) → rows
        for k, port in enumerate(ports):
            if port.shared_encode:
                groups.setdefault((port.talkgroup, port.side), []).append(k)
        self.groups = [(tg, side, np.array(ks, np.int64)) for (tg, side), ks in groups.items()]


class ConsoleBank(PortBank):
    """Every console seat of the site; the engine reads and writes them all at once."""

    def __init__(self, encoders: SharedEncoders, silence: bytes, engine: Any) -> None:
        self.encoders = encoders
        self.silence = silence
        self.engine = engine
        self._plan: _Plan | None = None
        self._replan = False
        self._talking = np.zeros(0, bool)
        self._was_talking: list[ConsolePort] = []
        # Each console's RTCP sender report once a second, spread over the ticks.
        self.report_ticks = max(1, round(REPORT_SECONDS / engine.frame_seconds))
        self.dtx_ticks = max(1, round(DTX_SECONDS / engine.frame_seconds))

    def _plan_for(self, ports: list[Port]) -> _Plan:
        plan = self._plan
        # The engine keeps the list per layout: a new list is a new layout.
        if plan is None or plan.ports is not ports or self._replan:
            plan = self._plan = _Plan(ports, plan)  # type: ignore[arg-type]
            self._replan = False
        return plan

    def replan(self) -> None:
        """A seat changed side: group the rows again on the next tick."""
        self._replan = True

    def read_frames(
        self, ports: list[Port], frames: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(ports)
        talking = np.fromiter((p.ptt for p in ports), bool, n)  # type: ignore[attr-defined]
        has = np.zeros(n, bool)
        for port in self._was_talking:
            port.talking = False
        talkers: list[ConsolePort] = []
        for k in np.flatnonzero(talking).tolist():
            port: ConsolePort = ports[k]  # type: ignore[assignment]
            port.talking = True
            talkers.append(port)
            frame = port.inbound.pop()
            if frame is not None:
                frames[rows[k]] = frame
                has[k] = True
        self._was_talking = talkers
        self._talking = talking
        return has, talking

    def write_frames(
        self, ports: list[Port], out: np.ndarray, rows: np.ndarray, audible: np.ndarray
    ) -> None:
        plan = self._plan_for(ports)
        talking = self._talking if len(self._talking) == len(ports) else np.zeros(len(ports), bool)
        tick = self.engine.tick_count
        done = ~audible  # silent consoles get the silence packet below
        for talkgroup, side, members in plan.groups:
            listening = members[audible[members] & ~talking[members]]
            if not listening.size:
                continue
            block = out[rows[listening]]
            same = (block == block[0]).all(axis=1)
            packets = self.encoders.encode(
                talkgroup, tick, block[0], int(np.count_nonzero(same)), side
            )
            sharing = listening[same]
            done[sharing] = True
            cons: list[ConsolePort] = [ports[k] for k in sharing.tolist()]  # type: ignore[misc]
            for payload in packets:
                for port in cons:
                    port.emit(payload)
        for k in np.flatnonzero(~done).tolist():  # talkers, busy tone, other gains
            ports[k].write_own(out[rows[k]])  # type: ignore[attr-defined]
        quiet = plan.quiet
        quiet[audible] = 0
        quiet[~audible] += 1
        pause = plan.dtx & (quiet > DTX_HANGOVER) & ((plan.phase + tick) % self.dtx_ticks != 0)
        for k in np.flatnonzero(~audible & ~pause).tolist():
            ports[k].emit(self.silence)  # type: ignore[attr-defined]
        for k in np.flatnonzero(pause).tolist():
            ports[k].direct.skip()  # type: ignore[attr-defined]
        for k in range(tick % self.report_ticks, len(ports), self.report_ticks):
            rtp = ports[k].direct  # type: ignore[attr-defined]
            if rtp is not None:
                rtp.report()
