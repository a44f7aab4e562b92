"""The PIN of a route: a caller neither hears nor is heard until it keys the PIN and ``#``.

Until then the leg's row is ``muted`` in the leg bank: the receive path does not let
it talk and the send path sends it silence (one column, no per-leg Python). The PIN
must be keyed exactly and ended with ``#`` — ``94321#`` is not ``4321`` — within
the route's ``pin_timeout``; each wrong entry is a failure, and the third ends the
call. What the caller keys is never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.sip.calls import CallManager, Dialog
    from gateway.sip.config import RouteConfig

log = logging.getLogger(__name__)

MAX_TRIES = 3
MAX_DIGITS = 32  # keyed digits kept before '#': more can only be a wrong PIN


class PinGate:
    """PIN entry of one call, fed with DTMF key presses.

    ``on_accept()`` runs when the right PIN and ``#`` were keyed; ``on_failure(tries,
    final)`` after each wrong one (``final`` on the last try). Both run at most
    once per entry; nothing runs after the gate is open or closed.
    """

    def __init__(
        self,
        pin: str,
        on_accept: Callable[[], None],
        on_failure: Callable[[int, bool], None],
    ) -> None:
        self.pin = pin
        self.on_accept = on_accept
        self.on_failure = on_failure
        self.keyed = ""
        self.too_long = False
        self.failures = 0
        self.state = "waiting"  # "waiting" | "open" | "closed"

    def press(self, digit: str) -> None:
        if self.state != "waiting":
            return
        if digit != "#":
            if len(self.keyed) < MAX_DIGITS:
                self.keyed += digit
            else:
                self.too_long = True  # can only be wrong; not kept
            return
        right = hmac.compare_digest(self.keyed, self.pin) and not self.too_long
        self.keyed, self.too_long = "", False
        if right:
            self.state = "open"
            self.on_accept()
            return
        self.failures += 1
        final = self.failures >= MAX_TRIES
        if final:
            self.state = "closed"
        self.on_failure(self.failures, final)

    def expire(self) -> bool:
        """The time to key the PIN is over: True if the gate was still waiting (close it)."""
        if self.state != "waiting":
            return False
        self.state = "closed"
        return True


def gate_call(calls: CallManager, dialog: Dialog, route_name: str, route: RouteConfig) -> PinGate:
    """The PIN gate of a new call on a PIN route, with its timer running.

    Right PIN: the leg's row is unmuted. Each wrong one: audited, the caller's
    address backed off; the last one, or no PIN within ``pin_timeout``: BYE.
    """

    def port() -> str | None:
        return dialog.leg.name if dialog.leg is not None else None

    def accepted() -> None:
        if dialog.leg is not None:
            calls.bank.table.muted[dialog.leg.row] = False
            log.info("call %s: PIN accepted", port())
            calls.audit("sip_pin_accepted", port=port(), route=route_name)

    def failed(tries: int, final: bool) -> None:
        calls.audit(
            "sip_pin_failed",
            port=port(),
            route=route_name,
            tries=tries,
            source=dialog.peer.address[0],
            hangup=final,
        )
        calls.admission.back_off(dialog.peer)
        if final:
            log.info("call %s: %d wrong PINs; hanging up", port(), tries)
            calls._spawn(calls.hangup(dialog))

    def expired() -> None:
        if dialog.ended.is_set() or not gate.expire():
            return
        log.info("call %s: no PIN in time; hanging up", port())
        calls.audit("sip_pin_timeout", port=port(), route=route_name, source=dialog.peer.address[0])
        calls.admission.back_off(dialog.peer)
        calls._spawn(calls.hangup(dialog))

    gate = PinGate(route.pin, accepted, failed)
    asyncio.get_running_loop().call_later(route.pin_timeout, expired)
    return gate
