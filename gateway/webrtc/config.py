"""``[console]``: who may use the dispatcher console, and what each operator may do.

Operators are configured per site, with password *hashes* only (``borderlink
passwd`` prints one). Permissions are per talkgroup because a CBSA dispatcher may
monitor the marine channel without being allowed to key it.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from gateway.config import Model
from gateway.units import Duration
from gateway.webrtc.passwords import SCHEME, check_hash_format

ALL = "*"


class OperatorConfig(Model):
    """One dispatcher account."""

    password_hash: str = Field(description="from 'borderlink passwd'; never the password itself")
    agency: str = ""
    display_name: str = ""
    talk: list[str] = []  # talkgroups this operator may key ("*": every talkgroup)
    monitor: list[str] = []  # talkgroups this operator may only listen to
    priority: int = 10  # floor priority when talking (radios default to 0)
    emergency: bool = False  # may press the emergency button (pre-empts the floor)
    emergency_priority: int = 100
    patch: bool = False  # may patch (and unpatch) talkgroups that are all in their `talk`
    links: bool = False  # may cut and restore cross-border links ([links]) from the console

    @field_validator("password_hash")
    @classmethod
    def _is_a_hash(cls, value: str) -> str:
        problem = check_hash_format(value)
        if problem:
            raise ValueError(
                f"{problem}; put the output of 'borderlink passwd' here (a '{SCHEME}$…' "
                "string), never a plain password"
            )
        return value

    def may_talk(self, talkgroup: str) -> bool:
        return ALL in self.talk or talkgroup in self.talk

    def may_monitor(self, talkgroup: str) -> bool:
        return self.may_talk(talkgroup) or ALL in self.monitor or talkgroup in self.monitor


class ConsoleConfig(Model):
    """The browser dispatcher console (served on the ``[web]`` server)."""

    operators: dict[str, OperatorConfig] = {}
    session_lifetime: Duration = 12 * 3600.0
    login_attempts: int = Field(5, ge=1, le=100)  # failures allowed per window…
    login_window: Duration = 300.0  # …within this long, per user and per address
    login_lockout: Duration = 60.0  # then refuse that user/address this long
    # Addresses the gateway offers ICE candidates on (empty: every interface).
    # ["127.0.0.1"] for a loopback-only site; remote candidates outside these
    # networks' reach are dropped so the gateway never probes other hosts.
    ice_addresses: list[str] = []
    ice_servers: list[str] = []  # STUN/TURN URLs, e.g. "stun:stun.example.org:3478"
    shared_encode: bool = True  # one Opus encode per talkgroup mix for listeners
    direct_rtp: bool = True  # send packets without aiortc's per-packet sender task
    dtx: bool = True  # in silence, one packet per 400 ms instead of one per frame (direct_rtp)
    opus_bitrate: int = Field(32000, ge=6000, le=128000)
    disconnect_grace: Duration = 10.0  # keep a console's audio this long after its socket drops

    @field_validator("operators")
    @classmethod
    def _names(cls, value: dict[str, OperatorConfig]) -> dict[str, OperatorConfig]:
        for name in value:
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(
                    f"operator name {name!r}: use letters, digits, '-', '_' or '.' only"
                )
        return value

    def summary_lines(self) -> list[str]:
        """What ``borderlink check`` prints: each operator and what they may do."""
        if not self.operators:
            return ["no operators: nobody can log in (add [console.operators.NAME])"]
        lines = []
        for name, op in self.operators.items():
            talk = ", ".join(op.talk) or "-"
            monitor = ", ".join(op.monitor) or "-"
            agency = f" [{op.agency}]" if op.agency else ""
            extra = ("  emergency" if op.emergency else "") + ("  patch" if op.patch else "")
            extra += "  links" if op.links else ""
            lines.append(f"operator {name:<14}{agency} talk: {talk}; monitor: {monitor}{extra}")
        return lines

    def talkgroup_references(self) -> list[tuple[tuple[str, ...], str]]:
        """Every talkgroup an operator's permissions name ("*" aside), so ``borderlink
        check`` and a reload refuse a typo that would silently deny a dispatcher."""
        return [
            (("operators", name, kind), talkgroup)
            for name, op in self.operators.items()
            for kind in ("talk", "monitor")
            for talkgroup in getattr(op, kind)
            if talkgroup != ALL
        ]
