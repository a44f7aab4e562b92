"""The demo's two gateways: each a ``borderlink run`` process of its own, watched over HTTP.

The demo talks to them only as an operator would: it writes their site files,
starts them, reloads one with SIGHUP (the patch), cuts and restores the link over
``borderlink link``'s control socket, and reads what is going on from each site's
``/metrics``. Nothing of a gateway's insides is shared with the demo process.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

TEMPLATES = Path(__file__).resolve().parents[2] / "config" / "demo"
FRAME = 0.02  # the templates' [timing] frame: the engine's clock is ticks × FRAME


def free_ports(count: int) -> list[int]:
    """``count`` different loopback ports that are free now (held open until all are found)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
        return [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


@dataclass
class Status:
    """One scrape of a site's /metrics, reduced to what the demo shows."""

    ticks: int = 0
    ports: dict[str, dict] = field(default_factory=dict)  # port → kind, talkgroup, talking...
    talkers: dict[str, int] = field(default_factory=dict)  # talkgroup → heard now
    link_state: str = "—"
    share_state: dict[str, str] = field(default_factory=dict)
    rtt: float | None = None
    patched: set[str] = field(default_factory=set)  # talkgroups patched to another


def parse_metrics(text: str) -> Status:
    status = Status()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "borderlink_engine_ticks_total":  # the simulated radios' clock
                status.ticks = int(value)
            elif name == "borderlink_talkgroup_talkers":
                status.talkers[labels["talkgroup"]] = int(value)
            elif name.startswith("borderlink_port_") and "port" in labels:
                port = status.ports.setdefault(
                    labels["port"],
                    {"kind": labels.get("kind", ""), "talkgroup": labels.get("talkgroup", "")},
                )
                key = name.removeprefix("borderlink_port_")
                if key in ("talking", "squelch_open", "ptt_keyed", "receive_level_dbfs"):
                    port[key] = value
            elif name == "borderlink_link_state" and value == 1:
                status.link_state = labels["state"]
            elif name == "borderlink_link_share_state" and value == 1:
                status.share_state[labels["share"]] = labels["state"]
            elif name == "borderlink_link_rtt_seconds":
                status.rtt = value
            elif name == "borderlink_talkgroup_patched" and value == 1:
                status.patched.add(labels["talkgroup"])
    return status


def _die_with_parent() -> None:
    """In the child: SIGTERM when the demo process dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Site:
    key: str  # "ca" or "us": the template's name
    country: str  # shown in the narration
    link: str  # this side's name for the link to the other
    folder: Path
    values: dict[str, object]
    process: subprocess.Popen | None = None
    started: float | None = None  # monotonic time of the engine's first tick
    status: Status = field(default_factory=Status)
    reachable: bool = False
    missed: int = 0  # failed scrapes in a row

    def remote_talkers(self, talkgroup: str) -> int:
        """Heard in ``talkgroup`` but not one of this site's own ports: the far side
        (links legs have no per-port series; they are counted per route)."""
        local = sum(
            1
            for p in self.status.ports.values()
            if p["talkgroup"] == talkgroup and p.get("talking")
        )
        return max(0, self.status.talkers.get(talkgroup, 0) - local)

    @property
    def config(self) -> Path:
        return self.folder / f"{self.key}.toml"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.key}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.values['web_port']}"

    def write_config(self, patch: bool) -> None:
        template = string.Template((TEMPLATES / f"{self.key}.toml").read_text(encoding="utf-8"))
        values = {**self.values, "dir": self.folder, "patch_enabled": str(patch).lower()}
        self.config.write_text(template.substitute(values), encoding="utf-8")

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", str(self.config)],
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops each site in turn
                preexec_fn=_die_with_parent,
            )

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def reload(self) -> None:
        """SIGHUP: the gateway re-reads its file and applies the difference live."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def engine_seconds(self, now: float) -> float | None:
        return None if self.started is None else now - self.started

    async def scrape(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(f"{self.url}/metrics") as reply:
                text = await reply.text()
                ok = reply.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        if not ok:  # one slow answer on a busy machine is not a gateway gone
            self.missed += 1
            self.reachable = self.missed < 3 and self.reachable
            return False
        self.status = parse_metrics(text)
        self.reachable, self.missed = True, 0
        if self.started is None and self.status.ticks:
            self.started = time.monotonic() - self.status.ticks * FRAME
        return True

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait: the gateway unkeys every transmitter and closes its ports."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def keyups(self) -> tuple[int, int, bool]:
        """From the site's audit log: transmitters keyed, unkeyed, and whether the log was
        closed by a clean stop (``audit_stop``) — how the demo knows every PTT was released."""
        keyed = unkeyed = 0
        closed = False
        try:
            lines = (self.folder / f"{self.key}-audit.jsonl").read_text(encoding="utf-8")
        except OSError:
            return 0, 0, False
        for line in lines.splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line).get("event")
                keyed += event == "ptt_on"
                unkeyed += event == "transmit"
                closed = closed or event == "audit_stop"
        return keyed, unkeyed, closed

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def make_sites(folder: Path, password_hash: str) -> tuple[Site, Site]:
    web_ca, web_us, tls_ca, tls_us = free_ports(4)
    common = {"password_hash": password_hash}
    ca = Site(
        "ca",
        "Canada",
        "us",
        folder,
        {**common, "web_port": web_ca, "tls_port": tls_ca, "peer_tls_port": tls_us},
    )
    us = Site(
        "us",
        "the U.S.",
        "ca",
        folder,
        {**common, "web_port": web_us, "tls_port": tls_us, "peer_tls_port": tls_ca},
    )
    for site in (ca, us):
        site.write_config(patch=False)
    os.chmod(folder, 0o700)
    return ca, us
