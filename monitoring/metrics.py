"""Prometheus metrics for a running site, read from the engine at scrape time.

The engine already keeps every per-port fact in NumPy arrays (who is admitted,
who is keyed, levels, floor locks) and per-port health, so nothing here runs
per port per tick: a scrape copies those arrays once (:meth:`SiteMetrics.snapshot`,
on the loop thread, so the copy is consistent) and the text is rendered from the
copy. The only per-tick cost is one histogram observation of the tick duration.
Counters that the engine does not keep (talk and transmit seconds, TOT trips,
floor grants) are counted from engine events, which are rare.

Endpoints plug in without this module knowing them:

- a port's ``stats()`` dict is mapped by well-known key (:data:`PORT_STATS`), so a
  SIP leg's packet counters or a sound card's device state appear as soon as the
  port reports them;
- a service (SIP stack, console, MQTT, audit) may have ``stats()`` returning the
  keys in :data:`SERVICE_STATS` (numbers, or ``{label: number}`` for per-account
  values such as SIP registrations).

Labels are bounded by the config: port, kind, talkgroup, route, patch, account, event
kind. Never a caller number or free text, and never one series per call: a port that
exists for one call (``per_call = True`` on its class, as on a SIP leg) is counted
under its ``route`` and talkgroup instead (:data:`CALL_KINDS`), so a stranger who calls
cannot add series, and the series do not tell how many calls were made when.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import platform
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:  # the gateway imports us, never the other way round at run time
    from gateway.app import Gateway
    from gateway.engine import Event

log = logging.getLogger(__name__)

PREFIX = "borderlink_"
PORT_LABELS = ["port", "kind", "talkgroup"]

# A scrape is built on the loop thread between ticks, in slices of at most this share
# of a frame each, each started right after a tick (see SiteMetrics.page).
SLICE_OF_FRAME = 0.25

# Tick durations: a 20 ms tick should cost well under a millisecond; the top
# buckets show ticks that ate the whole frame.
TICK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)

# port.stats() key → (metric name without prefix, type, help). See Port.stats().
PORT_STATS: dict[str, tuple[str, str, str]] = {
    "packets_in": ("leg_packets_in_total", "counter", "RTP/network packets received"),
    "packets_out": ("leg_packets_out_total", "counter", "RTP/network packets sent"),
    "bytes_in": ("leg_bytes_in_total", "counter", "Payload bytes received"),
    "bytes_out": ("leg_bytes_out_total", "counter", "Payload bytes sent"),
    "packets_lost": ("leg_packets_lost_total", "counter", "Packets never received (sequence gaps)"),
    "packets_late": (
        "leg_packets_late_total",
        "counter",
        "Packets that came after their playout time",
    ),
    "packets_malformed": ("leg_packets_malformed_total", "counter", "Packets dropped as malformed"),
    "jitter_seconds": ("leg_jitter_seconds", "gauge", "Interarrival jitter (RFC 3550)"),
    "concealed_samples": (
        "leg_concealed_samples_total",
        "counter",
        "Samples made up by loss concealment",
    ),
    "fec_recovered": (
        "leg_fec_recovered_total",
        "counter",
        "Frames decoded from the next packet's in-band FEC instead of concealed (Opus links)",
    ),
    "jitter_buffer_seconds": (
        "leg_jitter_buffer_seconds",
        "gauge",
        "Current jitter-buffer delay (arrival to playout, with the wait for the next tick)",
    ),
    # RTCP: what the far end says of the audio we send it, and the round trip
    "rtcp_reports_in": ("leg_rtcp_reports_in_total", "counter", "RTCP reports received"),
    "rtcp_reports_out": ("leg_rtcp_reports_out_total", "counter", "RTCP reports sent"),
    "remote_packets_lost": (
        "leg_remote_packets_lost",
        "gauge",
        "Packets of ours the far end reports lost (RTCP cumulative lost)",
    ),
    "remote_jitter_seconds": (
        "leg_remote_jitter_seconds",
        "gauge",
        "Jitter of our stream as the far end measures it (RTCP)",
    ),
    "rtt_seconds": ("leg_round_trip_seconds", "gauge", "Network round trip from RTCP (LSR/DLSR)"),
    "device_up": ("radio_device_up", "gauge", "1 while the radio's sound card / PTT device works"),
    "device_errors": ("radio_device_errors_total", "counter", "Sound card or PTT device errors"),
    "tx_seconds": (
        "radio_device_transmit_seconds_total",
        "counter",
        "Seconds the device was keyed",
    ),
    # sound-card radios (hardware/): the card, the keyer and the squelch detector
    "squelch_openings": ("radio_squelch_openings_total", "counter", "Times the squelch opened"),
    "ptt_keyups": ("radio_ptt_keyups_total", "counter", "Times the keyer keyed the radio"),
    "tot_trips": ("radio_transmit_tot_trips_total", "counter", "Keyer transmit TOT trips"),
    "watchdog_trips": (
        "radio_ptt_watchdog_trips_total",
        "counter",
        "Times the PTT guardian unkeyed for a missed gateway heartbeat",
    ),
    "ptt_stuck": (
        "radio_ptt_stuck",
        "gauge",
        "1 while a PTT line could not be unkeyed (device gone): the transmitter may be stuck keyed",
    ),
    "xruns": ("radio_xruns_total", "counter", "Sound card over/underruns seen by PortAudio"),
    "rx_underruns": ("radio_rx_underruns_total", "counter", "Ticks the card had no audio ready"),
    "tx_underruns": ("radio_tx_underruns_total", "counter", "Times the card ran out of TX audio"),
    "margin_widenings": (
        "radio_margin_widenings_total",
        "counter",
        "Times a FIFO's jitter margin widened (1 ms per underrun, up to +20 ms)",
    ),
    "dropped_samples": (
        "radio_dropped_samples_total",
        "counter",
        "Samples dropped: audio piled up behind a stall, or a full ring",
    ),
    "reopens": ("radio_device_reopens_total", "counter", "Times a lost sound card came back"),
    "rx_ratio_ppm": ("radio_rx_drift_ppm", "gauge", "Receive resampling correction (card drift)"),
    "tx_ratio_ppm": ("radio_tx_drift_ppm", "gauge", "Transmit resampling correction (card drift)"),
    "rx_buffer_seconds": ("radio_rx_buffer_seconds", "gauge", "Audio waiting in the receive FIFO"),
    "tx_buffer_seconds": ("radio_tx_buffer_seconds", "gauge", "Audio waiting in the transmit FIFO"),
    "rx_level_seconds": (
        "radio_rx_level_seconds",
        "gauge",
        "Receive FIFO level at the tick's instant, held at one card period plus the margin",
    ),
    "tx_level_seconds": (
        "radio_tx_level_seconds",
        "gauge",
        "Transmit FIFO level at the tick's instant, held at one card period plus the margin",
    ),
    "rx_margin_seconds": (
        "radio_rx_margin_seconds",
        "gauge",
        "Jitter margin the receive FIFO keeps beyond a card period",
    ),
    "tx_margin_seconds": (
        "radio_tx_margin_seconds",
        "gauge",
        "Jitter margin the transmit FIFO keeps beyond a card period",
    ),
}

# service.stats() key → (metric name without prefix, type, help, label or None).
SERVICE_STATS: dict[str, tuple[str, str, str, str | None]] = {
    "sip_registered": (
        "sip_registered",
        "gauge",
        "1 while the SIP account is registered",
        "account",
    ),
    "sip_registration_failures": (
        "sip_registration_failures_total",
        "counter",
        "Failed SIP REGISTER attempts",
        "account",
    ),
    "sip_calls_active": ("sip_calls_active", "gauge", "SIP calls up now", None),
    "sip_calls_total": ("sip_calls_total", "counter", "SIP calls answered or placed", None),
    "sip_calls_rejected": (
        "sip_calls_rejected_total",
        "counter",
        "SIP calls refused (digest challenges not counted)",
        None,
    ),
    "sip_calls_refused": (
        "sip_calls_refused_total",
        "counter",
        "SIP INVITEs answered with an error, by response code (401 challenges included)",
        "code",
    ),
    "sip_sources_backed_off": (
        "sip_sources_backed_off",
        "gauge",
        "Addresses refused for now after a wrong digest password or PIN",
        None,
    ),
    "sip_calls_srtp": ("sip_calls_srtp", "gauge", "SIP calls up now with SRTP media", None),
    "sip_messages_malformed": (
        "sip_messages_malformed_total",
        "counter",
        "Malformed SIP messages dropped",
        None,
    ),
    "sip_connections": ("sip_connections", "gauge", "SIP TCP/TLS connections open now", None),
    "sip_connections_refused": (
        "sip_connections_refused_total",
        "counter",
        "SIP TCP/TLS connections refused at a cap (in total or per source address)",
        None,
    ),
    # No peer label: a stranger picks the address, and would pick the label set too.
    "sip_tls_handshake_failures": (
        "sip_tls_handshake_failures_total",
        "counter",
        "SIP TLS handshakes that failed (untrusted certificate, pin mismatch, garbage, timeout)",
        None,
    ),
    "sip_tls_certificate_expiry_days": (
        "sip_tls_certificate_expiry_days",
        "gauge",
        "Days until the site's SIP TLS certificate expires",
        None,
    ),
    "sip_calls_timed_out": (
        "sip_calls_timed_out_total",
        "counter",
        "SIP calls ended by a timer: never ACKed (ack) or no RTP/RTCP (media)",
        "reason",
    ),
    "sip_messages_failed": (
        "sip_messages_failed_total",
        "counter",
        "SIP requests the gateway failed on and answered 500 (each one is a bug)",
        None,
    ),
    "sip_rtp_malformed": (
        "sip_rtp_malformed_total",
        "counter",
        "RTP/RTCP packets dropped on the shared media port, by kind",
        "kind",
    ),
    # Links: labels are config names (link, shared name) and a fixed set of states.
    "link_state": (
        "link_state",
        "gauge",
        "1 for the link's state now (up, down, cut here, cut_by_peer)",
        "link,state",
    ),
    "link_share_state": (
        "link_share_state",
        "gauge",
        "1 for each shared name's state now (up, down, cut, cut_by_peer)",
        "link,share,state",
    ),
    "link_rtt_seconds": (
        "link_rtt_seconds",
        "gauge",
        "Round trip of the link's SIP keepalive (OPTIONS over its TLS connection)",
        "link",
    ),
    "link_up_seconds": ("link_up_seconds", "gauge", "Seconds the link has been up", "link"),
    "link_invites_refused": (
        "link_invites_refused_total",
        "counter",
        "INVITEs from the link's peer refused (a name not shared, or cut here)",
        "link",
    ),
    "link_keepalive_timeouts": (
        "link_keepalive_timeouts_total",
        "counter",
        "Link dialogs dropped because the peer stopped answering the keepalive (dead link)",
        "link",
    ),
    # The peer's talker labels are never label values here (the peer would choose the
    # series): the audit log and MQTT name talkers; metrics count and flag them.
    "link_talker_rejected": (
        "link_talker_rejected_total",
        "counter",
        "Talker words from the peer not believed, by reason (a malformed header extension; "
        "a talker label INFO malformed, not from the peer, or over the cap)",
        "link,reason",
    ),
    "link_peer_talking": (
        "link_peer_talking",
        "gauge",
        "1 while the peer says a talker of its side is keyed on this shared name",
        "link,share",
    ),
    "link_peer_emergency": (
        "link_peer_emergency",
        "gauge",
        "1 while the peer's keyed talker on this shared name declares an emergency",
        "link,share",
    ),
    "link_relaying": (
        "link_relaying",
        "gauge",
        "Per talkgroup this site relays between its links: 1 relaying, 0 held back (a peer "
        "relays too, refuses onward, links directly to another, or has not said)",
        "talkgroup",
    ),
    "link_relay_held_back": (
        "link_relay_held_back_total",
        "counter",
        "Times the relay of a talkgroup was held back by the loop-free rule (see the log and "
        "the link_relay audit record for why)",
        "talkgroup",
    ),
    "console_sessions": ("console_sessions", "gauge", "Open dispatcher console sessions", None),
    "console_seats": ("console_seats", "gauge", "Console positions joined to talkgroups", None),
    "console_shared_encodes": (
        "console_opus_encodes_total",
        "counter",
        "Opus encodes for console listeners",
        None,
    ),
    "console_shared_reuses": (
        "console_opus_shared_total",
        "counter",
        "Console listeners served a shared encode",
        None,
    ),
    "console_talkgroup_seats": (
        "console_talkgroup_seats",
        "gauge",
        "Console positions joined to the talkgroup (talking: heard in its mix now)",
        "talkgroup,state",
    ),
    "console_packets_out": (
        "console_packets_out_total",
        "counter",
        "RTP packets sent to the consoles joined to the talkgroup (those that left included)",
        "talkgroup",
    ),
    "console_ptt_rate_limited": (
        "console_ptt_rate_limited_total",
        "counter",
        "Console PTT presses refused by the per-page rate limit",
        None,
    ),
    "console_foreign_origin": (
        "console_foreign_origin_refused_total",
        "counter",
        "Console requests refused because a page of another site sent them (Origin)",
        None,
    ),
    "console_alarms": (
        "console_alarms_open",
        "gauge",
        "Emergency alarms not yet acknowledged by an operator",
        None,
    ),
    "console_logins": ("console_logins_total", "counter", "Console logins accepted", None),
    "console_login_failures": ("console_login_failures_total", "counter", "Logins refused", None),
    "console_login_busy": (
        "console_login_busy_total",
        "counter",
        "Logins answered 503: every password-hash thread busy and the queue full",
        None,
    ),
    "mqtt_connected": ("mqtt_connected", "gauge", "1 while connected to the MQTT broker", None),
    "mqtt_reconnects": (
        "mqtt_reconnects_total",
        "counter",
        "Broker connections after the first",
        None,
    ),
    "mqtt_events_published": ("mqtt_events_published_total", "counter", "Events published", None),
    "mqtt_events_buffered": (
        "mqtt_events_buffered",
        "gauge",
        "Events waiting for the broker",
        None,
    ),
    "mqtt_events_dropped": (
        "mqtt_events_dropped_total",
        "counter",
        "Events lost: buffer full",
        None,
    ),
    "mqtt_commands": ("mqtt_commands_total", "counter", "MQTT commands by result", "result"),
    "audit_records": ("audit_records_total", "counter", "Records written to the audit log", None),
    "audit_write_errors": (
        "audit_write_errors_total",
        "counter",
        "Audit records not written",
        None,
    ),
}

# Kinds of per-call ports (``per_call = True``), each exported per (route, talkgroup) as
# ``<kind>_route_*``; its service reports the media figures as ``<kind>_routes`` in stats():
# {(route, talkgroup): {key: number}}, counters summed over the route's calls (ended ones
# included), gauges the largest among the calls up now.
CALL_KINDS = ("sip",)
ROUTE_LABELS = ["route", "talkgroup"]
# port.stats() key (see PORT_STATS) → per-route gauge: the largest among the calls up now.
ROUTE_GAUGES = ("jitter_seconds", "jitter_buffer_seconds", "remote_jitter_seconds", "rtt_seconds")
# The per-call counters, summed per route (remote_packets_lost is a gauge per call, but
# summed over calls, ended ones included, it only grows).
ROUTE_COUNTERS = (
    "packets_in",
    "packets_out",
    "bytes_in",
    "bytes_out",
    "packets_lost",
    "packets_late",
    "packets_malformed",
    "concealed_samples",
    "fec_recovered",
    "rtcp_reports_in",
    "rtcp_reports_out",
    "remote_packets_lost",
)


def route_family(kind: str, key: str) -> tuple[str, str, str]:
    """(name without prefix, type, help) of a per-route media family, from PORT_STATS."""
    name, _, doc = PORT_STATS[key]
    base = name.removeprefix("leg_").removesuffix("_total")
    if key in ROUTE_GAUGES:
        return f"{kind}_route_{base}_max", "gauge", f"{doc}: the largest among the calls up now"
    return f"{kind}_route_{base}_total", "counter", f"{doc}, summed over the route's calls"


# Per-port series read from the snapshot: (name, type, help, Snapshot attribute).
PORT_SERIES_UP = "1 when the port works (not isolated by the engine, device up)"
PORT_SERIES: list[tuple[str, str, str, str]] = [
    (
        "port_receive_level_dbfs",
        "gauge",
        "Receive level meter (RMS dBFS, falls back 20 dB/s; -120 = nothing)",
        "rx_dbfs",
    ),
    (
        "port_transmit_level_dbfs",
        "gauge",
        "Transmit level meter (RMS dBFS, falls back 20 dB/s; -120 = nothing)",
        "tx_dbfs",
    ),
    ("port_squelch_open", "gauge", "1 while the port has audio in (COR/VOX/PTT)", "squelch"),
    ("port_talking", "gauge", "1 while the port is heard in its talkgroup's mix", "admitted"),
    ("port_ptt_keyed", "gauge", "1 while the gateway keys this port's transmitter", "keyed"),
    (
        "port_ptt_keyed_seconds",
        "gauge",
        "How long the current transmission has lasted",
        "keyed_seconds",
    ),
    ("port_tot_seconds", "gauge", "The port's time-out timer (0 = off)", "tot_seconds"),
    ("port_talk_seconds", "counter", "Seconds the port was heard in its mix", "talk_total"),
    ("port_transmit_seconds", "counter", "Seconds the port's transmitter was keyed", "tx_total"),
    ("port_tot_trips", "counter", "Talkers cut off by the time-out timer", "tot_trips"),
    ("port_faults", "counter", "Times the engine isolated the port (errors, bad audio)", "faults"),
    ("port_bad_frames", "counter", "Frames dropped as NaN/Inf or out of range", "bad_frames"),
]

# Families that are always present (with no samples when nothing reports them),
# so dashboards and alert rules always find their names.
ALWAYS_SERVICE_KEYS = (
    "sip_registered",
    "sip_registration_failures",
    "console_sessions",
    "mqtt_connected",
)


class TickHistogram:
    """A histogram of tick durations that costs one bisect per tick, no lock."""

    def __init__(self, bounds: tuple[float, ...] = TICK_BUCKETS) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = np.cumsum(self.counts).tolist()
        labels = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        return list(zip(labels, cumulative, strict=True))


@dataclass
class Snapshot:
    """Everything a scrape needs, copied on the loop thread in one go."""

    site: str
    country: str
    version: str
    ports: list[tuple[str, str, str]]  # (name, kind, talkgroup)
    agency: list[str]
    up: np.ndarray
    admitted: np.ndarray
    keyed: np.ndarray
    squelch: np.ndarray
    rx_dbfs: np.ndarray
    tx_dbfs: np.ndarray
    keyed_seconds: np.ndarray
    tot_seconds: np.ndarray
    talk_total: np.ndarray
    tx_total: np.ndarray
    tot_trips: np.ndarray
    faults: np.ndarray
    bad_frames: np.ndarray
    port_stats: list[dict[str, float]]
    talkgroups: list[str]
    tg_patched: list[bool]
    tg_single: list[bool]
    floor_grants: dict[str, int]
    preemptions: dict[str, int]
    patches: dict[str, tuple[bool, tuple[str, ...]]]
    mix_groups: int
    ticks: int
    late_ticks: int
    skipped_ticks: int
    lateness_p50: float
    lateness_p99: float
    frame_seconds: float
    tick_buckets: list[tuple[str, float]]
    tick_sum: float
    events: dict[str, int]
    service_stats: list[dict[str, Any]] = field(default_factory=list)
    reload_failures: int = 0
    port_label_text: list[str] = field(default_factory=list)  # built off the loop, at render
    talkers: list[float] = field(default_factory=list)  # per talkgroup, calls included
    # Per-call ports, per (kind, route, talkgroup): calls up, talking, keyed.
    calls: dict[tuple[str, str, str], tuple[float, float, float]] = field(default_factory=dict)
    # Per kind: {(route, talkgroup): {key: number}}, counters made monotonic.
    routes: dict[str, dict[tuple[str, str], dict[str, float]]] = field(default_factory=dict)


@dataclass
class PortSplit:
    """A layout's ports split into config ports (a series each) and per-call ports (counted
    per route). Built when the layout changes (a call came or went), not per scrape."""

    layout: Any
    config_rows: np.ndarray  # engine rows of config ports
    call_rows: np.ndarray  # engine rows of per-call ports
    call_group: np.ndarray  # per call row: its index in ``groups``
    groups: list[tuple[str, str, str]]  # (kind, route, talkgroup)
    tg_of_row: np.ndarray  # per engine row: index in the engine's talkgroups, -1 for none
    talkgroups: list[str]


def split_ports(layout: Any, talkgroups: list[str]) -> PortSplit:
    per_call = [bool(getattr(p, "per_call", False)) for p in layout.ports]
    config_rows = np.array([i for i, c in enumerate(per_call) if not c], np.int64)
    call_rows = np.array([i for i, c in enumerate(per_call) if c], np.int64)
    group_ids: dict[tuple[str, str, str], int] = {}
    call_group = []
    for i in call_rows.tolist():
        port = layout.ports[i]
        key = (port.kind, str(getattr(port, "route", "")), layout.talkgroup[i] or "")
        call_group.append(group_ids.setdefault(key, len(group_ids)))
    tg_index = {tg: i for i, tg in enumerate(talkgroups)}
    tg_of_row = np.array([tg_index.get(tg or "", -1) for tg in layout.talkgroup], np.int64)
    return PortSplit(
        layout,
        config_rows,
        call_rows,
        np.array(call_group, np.int64),
        list(group_ids),
        tg_of_row,
        list(talkgroups),
    )


class SiteMetrics:
    """Counts engine events and takes snapshots for the exporter; one per gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.talk_seconds: dict[str, float] = defaultdict(float)
        self.tx_seconds: dict[str, float] = defaultdict(float)
        self.tot_trips: dict[str, int] = defaultdict(int)
        self.floor_grants: dict[str, int] = defaultdict(int)
        self.preemptions: dict[str, int] = defaultdict(int)
        self.events: dict[str, int] = defaultdict(int)
        self._reported: dict[tuple[str, str], float] = {}
        self._split: PortSplit | None = None
        # Per-route counters: the last value reported and what to add so it never goes back
        # (a bank that started over, a route whose last call ended mid-report).
        self._route_last: dict[tuple[str, str, str, str], float] = {}
        self._route_offset: dict[tuple[str, str, str, str], float] = defaultdict(float)
        self._ticked: list[asyncio.Future[None]] = []  # scrapes waiting for the next tick
        self.slice_ticks: list[int] = []  # tick_count at each slice of the last page
        self.longest_slice = 0.0  # CPU seconds of the longest slice of the last page (bench)
        self.tick_histogram = TickHistogram()
        gateway.engine.listeners.append(self.on_event)
        self._hook_clock()

    @classmethod
    def of(cls, gateway: Gateway) -> SiteMetrics:
        """The gateway's metrics, created on first use (by the exporter or a test)."""
        existing = getattr(gateway, "metrics", None)
        if isinstance(existing, cls):
            return existing
        metrics = cls(gateway)
        gateway.metrics = metrics  # type: ignore[attr-defined]
        return metrics

    def _hook_clock(self) -> None:
        """Observe every tick's duration: one call per tick, wrapped around engine.tick."""
        clock, engine, histogram = self.gateway.clock, self.gateway.engine, self.tick_histogram
        inner = clock.on_tick
        waiting = self._ticked

        def tick() -> None:
            inner()
            histogram.observe(engine.last_tick_seconds)
            if waiting:  # a scrape goes on right after this tick
                for future in waiting:
                    if not future.done():
                        future.set_result(None)
                waiting.clear()

        clock.on_tick = tick

    # --- events (rare: a few per second at most) -----------------------------------

    def on_event(self, event: Event) -> None:
        self.events[event.kind] += 1
        if event.port is None:
            return
        if event.kind == "talk_stop":
            self.talk_seconds[event.port] += event.seconds
        elif event.kind == "ptt_off":
            self.tx_seconds[event.port] += event.seconds
        elif event.kind == "tot":
            self.tot_trips[event.port] += 1
        elif event.kind == "floor_granted":
            self.floor_grants[self._talkgroup_of(event.port)] += 1
        elif event.kind == "preempted":
            self.preemptions[self._talkgroup_of(event.port)] += 1

    def _talkgroup_of(self, port: str) -> str:
        layout = self.gateway.engine.layout
        for p, tg in zip(layout.ports, layout.talkgroup, strict=False):
            if p.name == port:
                return tg or ""
        return ""

    # --- scrape ---------------------------------------------------------------------

    async def page(self) -> bytes:
        """The /metrics page, built on the loop thread between ticks.

        A scrape of 1250 calls is some 40 ms of Python. In a worker thread it still
        held the tick up (95-155 ms stalls seen): its Python takes the GIL the tick
        needs, 5 ms at a time, each time the tick lets go of it for a socket call.
        So the page is built here, in slices of at most a quarter frame, each begun
        right after a tick, while the rest of the frame is idle: no tick waits.
        """
        budget = SLICE_OF_FRAME * self.gateway.engine.frame_seconds
        self.slice_ticks, self.longest_slice = [], 0.0
        until = await self._slice(budget)
        for _ in range(3):  # a call that joins or leaves meanwhile: take them again
            layout = self.gateway.engine.layout
            port_stats: list[dict[str, float]] = []
            for port in self._config_ports(layout):
                port_stats.append(_stats_of(port))
                if time.perf_counter() > until:
                    until = await self._slice(budget)
            if self.gateway.engine.layout is layout:
                break
        else:
            layout = self.gateway.engine.layout
            port_stats = [_stats_of(port) for port in self._config_ports(layout)]
        until = await self._slice(budget)  # the snapshot and the labels: a few ms in one go
        snap = self.snapshot(port_stats)
        parts = []
        for family in families(snap):
            parts.append(family.text())
            if time.perf_counter() > until:
                until = await self._slice(budget)
        body = "".join(parts).encode()
        self._slice_done(until, budget)
        return body

    async def _slice(self, budget: float) -> float:
        """Wait for the next tick to end (a frame at most); the time this slice ends."""
        self._slice_done(until=None, budget=budget)
        future = asyncio.get_running_loop().create_future()
        self._ticked.append(future)
        await asyncio.wait([future], timeout=self.gateway.engine.frame_seconds * 2)
        self.slice_ticks.append(self.gateway.engine.tick_count)
        self._slice_started = time.thread_time()  # CPU: the machine's own stalls aside
        clock = self.gateway.clock
        now = time.perf_counter()
        if clock.start is None:
            return now + budget
        # A slow tick leaves less of the frame: stop a quarter frame before the next one.
        next_tick = clock.deadline(clock.ticks + clock.skipped_ticks)
        left = next_tick - time.monotonic() - budget
        return now + max(0.0, min(budget, left))

    def _slice_done(self, until: float | None, budget: float) -> None:
        if self.slice_ticks:
            took = time.thread_time() - self._slice_started
            self.longest_slice = max(self.longest_slice, took)

    def split(self, layout: Any) -> PortSplit:
        """The layout's config and per-call ports (kept until the layout changes)."""
        talkgroups = list(self.gateway.engine.talkgroups)
        split = self._split
        if split is None or split.layout is not layout or split.talkgroups != talkgroups:
            split = self._split = split_ports(layout, talkgroups)
        return split

    def _config_ports(self, layout: Any) -> list:
        return [layout.ports[i] for i in self.split(layout).config_rows.tolist()]

    def snapshot(self, port_stats: list[dict[str, float]] | None = None) -> Snapshot:
        """Copy the engine's state; call on the loop thread (the engine's thread).
        ``port_stats``: the config ports' ``stats()``, taken already for this layout."""
        from gateway import __version__

        gw = self.gateway
        engine, clock = gw.engine, gw.clock
        layout = engine.layout
        split = self.split(layout)
        rows = split.config_rows
        ports = [layout.ports[i] for i in rows.tolist()]
        tick = engine.tick_count
        frame = engine.frame_seconds
        names = [p.name for p in ports]
        port_labels = [
            (name, p.kind, layout.talkgroup[i] or "")
            for name, p, i in zip(names, ports, rows.tolist(), strict=True)
        ]
        if port_stats is None:
            port_stats = [_stats_of(port) for port in ports]
        health = [engine.health.get(name) for name in names]
        down = np.array([h is not None and h.down_until_tick > tick for h in health], bool)
        device_down = np.array(
            [
                s.get("device_up", 1) == 0 or bool(getattr(p, "down_reason", ""))
                for s, p in zip(port_stats, ports, strict=True)
            ],
            bool,
        )
        squelch = np.array(
            [
                float(s.get("squelch_open", p.talking))
                for s, p in zip(port_stats, ports, strict=True)
            ],
            np.float64,
        )
        all_keyed = engine.keying.keyed.copy()
        all_admitted = engine.admitted.copy()
        keyed, admitted = all_keyed[rows], all_admitted[rows]
        keyed_seconds = np.where(keyed, (tick - engine.key_since[rows]) * frame, 0.0)
        talking_seconds = np.where(admitted, (tick - engine.talk_since[rows]) * frame, 0.0)
        talk_total = self._monotonic("talk", names, self.talk_seconds, talking_seconds)
        tx_total = self._monotonic("tx", names, self.tx_seconds, keyed_seconds)
        self._forget_gone(set(names))
        tg_names = list(engine.talkgroups)
        tg_group = {tg: g for g in layout.groups for tg in g.talkgroups}
        lateness = clock.lateness
        buckets = self.tick_histogram.buckets()
        services = service_reports(gw)
        talking_rows = split.tg_of_row[all_admitted & (split.tg_of_row >= 0)]
        talkers = np.bincount(talking_rows, minlength=len(tg_names)).astype(np.float64)
        return Snapshot(
            site=gw.config.site.name,
            country=gw.config.site.country,
            version=__version__,
            ports=port_labels,
            agency=[getattr(p.config, "agency", "") for p in ports],
            up=~(down | device_down),
            admitted=admitted,
            keyed=keyed,
            squelch=squelch,
            rx_dbfs=engine.rx_dbfs[rows],
            tx_dbfs=engine.tx_dbfs[rows],
            keyed_seconds=keyed_seconds,
            tot_seconds=np.array([p.config.tot for p in ports], np.float64),
            talk_total=talk_total,
            tx_total=tx_total,
            tot_trips=np.array([self.tot_trips.get(name, 0) for name in names], np.float64),
            faults=np.array([h.faults if h else 0 for h in health], np.float64),
            bad_frames=np.array([h.bad_frames if h else 0 for h in health], np.float64),
            port_stats=port_stats,
            talkgroups=tg_names,
            tg_patched=[bool(tg_group.get(tg) and tg_group[tg].patched) for tg in tg_names],
            tg_single=[
                bool(tg_group.get(tg) and tg_group[tg].floor == "single") for tg in tg_names
            ],
            floor_grants=dict(self.floor_grants),
            preemptions=dict(self.preemptions),
            patches={
                name: (name in engine.active_patches, tuple(p.talkgroups))
                for name, p in engine.patches.items()
            },
            mix_groups=len(layout.groups),
            ticks=clock.ticks,
            late_ticks=clock.late_ticks,
            skipped_ticks=clock.skipped_ticks,
            lateness_p50=lateness.percentile(50),
            lateness_p99=lateness.percentile(99),
            frame_seconds=frame,
            tick_buckets=buckets,
            tick_sum=self.tick_histogram.sum,
            events=dict(self.events),
            service_stats=services,
            reload_failures=getattr(gw, "reload_failures", 0),
            talkers=talkers.tolist(),
            calls=self._calls(split, all_admitted, all_keyed),
            routes=self._routes(services),
        )

    @staticmethod
    def _calls(
        split: PortSplit, admitted: np.ndarray, keyed: np.ndarray
    ) -> dict[tuple[str, str, str], tuple[float, float, float]]:
        """Per (kind, route, talkgroup): calls up, heard in the mix, sent audio (NumPy)."""
        n = len(split.groups)
        if not n:
            return {}
        groups, rows = split.call_group, split.call_rows
        up = np.bincount(groups, minlength=n).tolist()
        talking = np.bincount(groups, weights=admitted[rows], minlength=n).tolist()
        sending = np.bincount(groups, weights=keyed[rows], minlength=n).tolist()
        return {g: (up[i], talking[i], sending[i]) for i, g in enumerate(split.groups)}

    def _routes(
        self, services: list[dict[str, Any]]
    ) -> dict[str, dict[tuple[str, str], dict[str, float]]]:
        """The services' per-route media figures, counters kept from ever going back."""
        routes: dict[str, dict[tuple[str, str], dict[str, float]]] = {}
        for kind in CALL_KINDS:
            merged: dict[tuple[str, str], dict[str, float]] = {}
            for report in services:
                for group, figures in dict(report.get(f"{kind}_routes", {})).items():
                    merged[(str(group[0]), str(group[1]))] = dict(figures)
            for (route, tg), figures in merged.items():
                for key in ROUTE_COUNTERS:
                    if key not in figures:
                        continue
                    which = (kind, route, tg, key)
                    total = float(figures[key]) + self._route_offset[which]
                    last = self._route_last.get(which, 0.0)
                    if total < last:
                        self._route_offset[which] += last - total
                        total = last
                    figures[key] = self._route_last[which] = total
            routes[kind] = merged
        return routes

    def _monotonic(
        self, what: str, names: list[str], done: dict[str, float], ongoing: np.ndarray
    ) -> np.ndarray:
        """Completed + ongoing seconds, never going backwards.

        The engine drops a PTT without a ``ptt_off`` event when it isolates a faulty
        port; the ongoing stretch seen at the last scrape is then kept as completed.
        """
        total = np.array([done.get(name, 0.0) for name in names], np.float64) + ongoing
        for i, name in enumerate(names):
            last = self._reported.get((what, name), 0.0)
            if total[i] < last:
                done[name] = done.get(name, 0.0) + (last - total[i])
                total[i] = last
            self._reported[(what, name)] = float(total[i])
        return total

    def _forget_gone(self, names: set[str]) -> None:
        """Drop counters of ports that left (ended calls), so label sets stay bounded."""
        for table in (self.talk_seconds, self.tx_seconds, self.tot_trips):
            for gone in [k for k in table if k not in names]:
                del table[gone]
        for key in [k for k in self._reported if k[1] not in names]:
            del self._reported[key]

    def render(self, snapshot: Snapshot | None = None) -> bytes:
        """The Prometheus text exposition for a snapshot (safe to run off the loop)."""
        return render_text(list(families(snapshot or self.snapshot())))

    def collector(self, snapshot: Snapshot | None = None) -> _Collector:
        """A prometheus_client Collector: register it in any CollectorRegistry."""
        return _Collector(self, snapshot)


def _stats_of(port: Any) -> dict[str, float]:
    try:
        return dict(port.stats())
    except Exception:  # a broken stats() must not break the scrape
        return {}


def service_reports(gateway: Gateway) -> list[dict[str, Any]]:
    """``stats()`` of every service and of the SIP/console objects the gateway carries."""
    reports: list[dict[str, Any]] = []
    seen: set[int] = set()
    names = ("sip", "console", "mqtt", "audit")
    for obj in [*gateway.services, *(getattr(gateway, n, None) for n in names)]:
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        try:
            stats = getattr(obj, "stats", None)
            report = dict(stats()) if callable(stats) else {}
        except Exception:  # a broken stats() must not break the scrape
            log.exception("stats() of %r failed", obj)
            continue
        if report:
            reports.append(report)
    return reports


class Family:
    """One metric family, kept as ready-to-print label text and values.

    prometheus_client's own ``add_metric`` and text writer cost ~40 µs a sample
    (label validation and escaping per sample), half a second for a 1000-port
    site; here each port's label text is built once per scrape and reused by
    every per-port family. :meth:`to_metric` gives the prometheus_client object
    for the Collector interface, and the tests check both render the same.
    """

    def __init__(self, kind: str, name: str, doc: str, labels: list[str] | None = None) -> None:
        self.kind = kind  # gauge, counter, histogram
        self.name = name  # without the _total suffix
        self.doc = doc
        self.labels = list(labels or [])
        # Three columns, not a tuple per sample: tens of thousands of tuples living
        # through a page built over several frames pushed the cyclic GC into 70 ms
        # full collections. Strings and floats are not tracked by it.
        self.texts: list[str] = []  # label text per sample
        self.label_values: list[tuple[str, ...]] = []
        self.values: list[float] = []
        self.buckets: list[tuple[str, float]] = []
        self.sum_value = 0.0

    def add_metric(self, values: list[str] | tuple[str, ...], value: float) -> None:
        self.texts.append(label_text(self.labels, values))
        self.label_values.append(tuple(values))
        self.values.append(float(value))

    def add_prebuilt(self, texts: list[str], values: list[tuple[str, ...]], data: list) -> None:
        if not len(texts) == len(values) == len(data):
            raise ValueError(f"{self.name}: {len(texts)} labels for {len(data)} values")
        self.texts.extend(texts)
        self.label_values.extend(values)
        self.values.extend(map(float, data))

    @property
    def sample_name(self) -> str:
        return self.name + "_total" if self.kind == "counter" else self.name

    def to_metric(self) -> Metric:
        if self.kind == "histogram":
            return HistogramMetricFamily(
                self.name, self.doc, buckets=self.buckets, sum_value=self.sum_value
            )
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        metric = cls(self.name, self.doc, labels=self.labels)
        for values, value in zip(self.label_values, self.values, strict=True):
            metric.add_metric(list(values), value)
        return metric

    def text(self) -> str:
        name = self.sample_name
        doc = self.doc.replace("\\", "\\\\").replace("\n", "\\n")
        head = f"# HELP {name} {doc}\n# TYPE {name} {self.kind}\n"
        if self.kind == "histogram":
            lines = [f'{name}_bucket{{le="{le}"}} {number(v)}' for le, v in self.buckets]
            count = self.buckets[-1][1] if self.buckets else 0.0
            lines += [f"{name}_count {number(count)}", f"{name}_sum {number(self.sum_value)}"]
        else:
            lines = [
                f"{name}{{{t}}} {number(v)}" if t else f"{name} {number(v)}"
                for t, v in zip(self.texts, self.values, strict=True)
            ]
        return head + "".join(line + "\n" for line in lines)


def label_text(names: list[str], values: list[str] | tuple[str, ...]) -> str:
    return ",".join(f'{n}="{escape(v)}"' for n, v in zip(names, values, strict=True))


def escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value: float) -> str:
    """Go-style float text, as Prometheus writes it."""
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_text(fams: list[Family]) -> bytes:
    return "".join(f.text() for f in fams).encode()


class _Collector:
    """The prometheus_client Collector for one snapshot (or a fresh one per collect)."""

    def __init__(self, metrics: SiteMetrics, snapshot: Snapshot | None = None) -> None:
        self.metrics = metrics
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot or self.metrics.snapshot()
        return (f.to_metric() for f in families(snap))


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> Family:
    return Family("gauge", PREFIX + name, doc, labels)


def _counter(name: str, doc: str, labels: list[str] | None = None) -> Family:
    return Family("counter", PREFIX + name, doc, labels)


def _per_port(family: Family, snap: Snapshot, values: np.ndarray) -> Family:
    family.add_prebuilt(snap.port_label_text, snap.ports, values.astype(np.float64).tolist())
    return family


def families(snap: Snapshot) -> Iterator[Family]:
    """Every metric family the gateway exports, built from one snapshot."""
    if len(snap.port_label_text) != len(snap.ports):
        snap.port_label_text = [label_text(PORT_LABELS, labels) for labels in snap.ports]
    build = _gauge(
        "build_info", "BorderLink version and Python running this gateway", ["version", "python"]
    )
    build.add_metric([snap.version, platform.python_version()], 1)
    yield build
    site = _gauge("site_info", "The site this gateway serves", ["site", "country"])
    site.add_metric([snap.site, snap.country], 1)
    yield site

    # --- ports ---
    info = _gauge(
        "port_info", "One per port on the engine, with its agency", [*PORT_LABELS, "agency"]
    )
    for labels, agency in zip(snap.ports, snap.agency, strict=True):
        info.add_metric([*labels, agency], 1)
    yield info
    yield _per_port(_gauge("port_up", PORT_SERIES_UP, PORT_LABELS), snap, snap.up)
    by_kind: dict[tuple[str, str], int] = defaultdict(int)
    for (_, kind, _), up in zip(snap.ports, snap.up.tolist(), strict=True):
        by_kind[(kind, "up" if up else "down")] += 1
    ports = _gauge(
        "ports", "Ports on the engine by kind and state (calls: per route)", ["kind", "state"]
    )
    for kind in sorted({k for k, _ in by_kind}):
        for state in ("up", "down"):
            ports.add_metric([kind, state], by_kind.get((kind, state), 0))
    yield ports
    for name, kind, doc, attribute in PORT_SERIES:
        family = (_counter if kind == "counter" else _gauge)(name, doc, PORT_LABELS)
        yield _per_port(family, snap, getattr(snap, attribute))
    yield from _port_stats(snap)
    yield from _route_stats(snap)

    # --- talkgroups and patches ---
    talkers = snap.talkers or [0.0] * len(snap.talkgroups)
    tg_metrics = [
        (
            _gauge(
                "talkgroup_talkers",
                "Ports and calls heard in the talkgroup right now",
                ["talkgroup"],
            ),
            talkers,
        ),
        (
            _gauge(
                "talkgroup_patched", "1 while the talkgroup is patched to another", ["talkgroup"]
            ),
            [float(x) for x in snap.tg_patched],
        ),
        (
            _gauge(
                "talkgroup_floor_single",
                "1 when one talker holds the floor (single), 0 for a full mix",
                ["talkgroup"],
            ),
            [float(x) for x in snap.tg_single],
        ),
        (
            _counter("talkgroup_floor_grants", "Floor grants in single-floor mode", ["talkgroup"]),
            [snap.floor_grants.get(tg, 0) for tg in snap.talkgroups],
        ),
        (
            _counter(
                "talkgroup_preemptions",
                "Floor holders pre-empted by a higher priority",
                ["talkgroup"],
            ),
            [snap.preemptions.get(tg, 0) for tg in snap.talkgroups],
        ),
    ]
    for family, values in tg_metrics:
        for tg, value in zip(snap.talkgroups, values, strict=True):
            family.add_metric([tg], float(value))
        yield family
    active = _gauge("patch_active", "1 while the patch joins its talkgroups", ["patch"])
    member = _gauge(
        "patch_member", "Talkgroups a patch joins (1 per member)", ["patch", "talkgroup"]
    )
    for name, (on, tgs) in snap.patches.items():
        active.add_metric([name], float(on))
        for tg in tgs:
            member.add_metric([name, tg], 1)
    yield active
    yield member
    mix = _gauge("mix_groups", "Mix groups the talkgroups and active patches make")
    mix.add_metric([], snap.mix_groups)
    yield mix

    # --- engine ---
    ticks = Family(
        "histogram",
        PREFIX + "engine_tick_duration_seconds",
        "CPU time of one engine tick (read, mix, write)",
    )
    ticks.buckets, ticks.sum_value = snap.tick_buckets, snap.tick_sum
    yield ticks
    for name, doc, value in (
        ("engine_ticks", "Engine ticks run", snap.ticks),
        (
            "engine_late_ticks",
            "Ticks that started more than a frame after their deadline",
            snap.late_ticks,
        ),
        (
            "engine_skipped_ticks",
            "Ticks skipped because the loop fell too far behind",
            snap.skipped_ticks,
        ),
    ):
        family = _counter(name, doc)
        family.add_metric([], value)
        yield family
    late = _gauge(
        "engine_tick_lateness_seconds", "Recent tick start lateness, by percentile", ["percentile"]
    )
    late.add_metric(["50"], snap.lateness_p50)
    late.add_metric(["99"], snap.lateness_p99)
    yield late
    frame = _gauge("engine_frame_seconds", "The engine frame (tick period)")
    frame.add_metric([], snap.frame_seconds)
    yield frame
    events = _counter(
        "events", "Engine events by kind (PTT, talk, floor, TOT, faults, patches)", ["kind"]
    )
    for kind in sorted(snap.events):
        events.add_metric([kind], snap.events[kind])
    yield events
    reloads = _counter(
        "reload_failures",
        "Config reloads refused (bad file, a port that cannot "
        "start, an error while applying): the running config stayed",
    )
    reloads.add_metric([], snap.reload_failures)
    yield reloads
    yield from _service_stats(snap)


def _port_stats(snap: Snapshot) -> Iterator[Family]:
    """Endpoint counters (per call, per radio): label text built once per port, not per key."""
    for key, (name, kind, doc) in PORT_STATS.items():
        rows = [i for i, s in enumerate(snap.port_stats) if key in s]
        if not rows:
            continue
        family = (_counter if kind == "counter" else _gauge)(
            name.removesuffix("_total"), doc, PORT_LABELS
        )
        family.add_prebuilt(
            [snap.port_label_text[i] for i in rows],
            [snap.ports[i] for i in rows],
            [snap.port_stats[i][key] for i in rows],
        )
        yield family


def _route_stats(snap: Snapshot) -> Iterator[Family]:
    """Per-call ports, per (route, talkgroup): how many calls, and their media summed."""
    for kind in CALL_KINDS:
        figures = snap.routes.get(kind, {})
        calls = {(r, tg): v for (k, r, tg), v in snap.calls.items() if k == kind}
        groups = sorted(set(figures) | set(calls))
        for i, (name, doc) in enumerate(
            (
                ("route_calls", "Calls up now"),
                ("route_calls_talking", "Calls heard in their talkgroup's mix now"),
                ("route_calls_keyed", "Calls the gateway sends talkgroup audio to now"),
            )
        ):
            family = _gauge(f"{kind}_{name}", doc, ROUTE_LABELS)
            for group in groups:
                family.add_metric(group, calls.get(group, (0.0, 0.0, 0.0))[i])
            yield family
        for key in (*ROUTE_COUNTERS, *ROUTE_GAUGES):
            name, kind_of, doc = route_family(kind, key)
            family = (_counter if kind_of == "counter" else _gauge)(
                name.removesuffix("_total"), doc, ROUTE_LABELS
            )
            for group in groups:
                value = figures.get(group, {}).get(key)
                if value is not None:
                    family.add_metric(group, value)
            yield family


def _service_stats(snap: Snapshot) -> Iterator[Family]:
    for key, (name, kind, doc, label) in SERVICE_STATS.items():
        reports = [s[key] for s in snap.service_stats if key in s]
        if not reports and key not in ALWAYS_SERVICE_KEYS:
            continue
        make = _counter if kind == "counter" else _gauge
        labels = label.split(",") if label else None  # "link,state": keys are tuples
        family = make(name.removesuffix("_total"), doc, labels)
        for value in reports:
            if label:
                for label_value, v in dict(value).items():
                    values = label_value if isinstance(label_value, tuple) else (label_value,)
                    family.add_metric([str(x) for x in values], float(v))
            else:
                family.add_metric([], float(value))
        yield family
