"""A SIP call as the engine sees it: a Port whose audio lives in a row of the leg bank.

The engine calls ``read()``/``talking``/``write()`` once per tick; all of that is a
row lookup, because the bank already received, decoded and VOX-checked every leg
before the tick and encodes and sends them all after it.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.config import PortConfig, Timing
from gateway.ports import Frame, Port
from gateway.sip.bank import LegBank
from gateway.units import format_duration


def leg_config(tot: float, description: str = "") -> PortConfig:
    """A phone is full duplex and has no transmitter to hold keyed: no hang time."""
    return PortConfig.model_validate(
        {
            "kind": "sip",
            "ptt_hang_time": 0,
            "tot": format_duration(tot),
            "description": description,
        }
    )


class SipLeg(Port):
    """One call (incoming or dial-out). ``keyed`` just means there is audio for the phone."""

    kind = "sip"
    # One port per call: metrics count it under its route, never as a series of its own
    # (a caller would pick how many series there are, and they would tell call volume).
    per_call = True

    def __init__(
        self,
        name: str,
        config: PortConfig,
        timing: Timing,
        bank: LegBank,
        row: int,
        route: str = "",
    ) -> None:
        super().__init__(name, config, timing)
        self.route = route  # the [sip.routes] name (or dialout-<talkgroup>): a metrics label
        self.bank = bank
        self.port_bank = bank  # the engine moves every leg's audio in one step (PortBank)
        self.row = row
        self.on_close: Callable[[SipLeg], None] | None = None

    def close(self) -> None:
        """The site dropped this port (its talkgroup left the config): end the call."""
        super().close()
        if self.on_close is not None:
            callback, self.on_close = self.on_close, None
            callback(self)

    def read(self) -> Frame | None:  # one port at a time (an engine without port banks)
        row = self.row
        talking = bool(self.bank.table.talking[row])
        self.talking = talking
        return self.bank.table.rx[row] if talking else None

    def write(self, frame: Frame | None) -> None:
        if frame is not None:
            self.bank.table.tx[self.row] = frame
            self.bank.table.tx_has[self.row] = True

    def send_dtmf(self, digits: str) -> None:
        """Queue RFC 4733 digits toward the phone (sent on the next ticks)."""
        self.bank.send_path.queue_dtmf(self.row, digits)

    def stats(self) -> dict[str, float]:
        return self.bank.stats(self.row)
