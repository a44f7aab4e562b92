"""MQTT: live state and events out, patch and PTT commands in, for CAD and C2 systems.

Topics, under ``borderlink/<site_id>/``:

- ``status``: retained ``online``; the broker publishes ``offline`` (our will) if we vanish.
- ``state/ports/<port>``, ``state/talkgroups/<tg>``, ``state/patches/<patch>``:
  retained JSON, republished whenever it changes and after every reconnect
  (a restarted broker has forgotten it). A port that leaves (a call ends) has its
  retained state cleared.
- ``event/<kind>``: one JSON message per engine event (talk_start/stop with the
  talker, ptt_on/off, floor_granted, preempted, talker_named, tot, fault, patch) and for ports
  that join or leave at run time (calls, console sessions).
- ``command/<sender>``: JSON commands; the reply goes to ``reply/<sender>``.
  ``sender`` must be in ``[mqtt.commanders]`` with the action allowed. Pair it
  with a broker ACL (mosquitto: ``pattern write borderlink/+/command/%u``) so a
  client can only speak as itself.

Commands: ``{"id": "42", "action": "patch", "patch": "pursuit"}``, ``unpatch``
(same), ``unkey`` / ``release`` with ``"port"`` (force a transmitter down and
hold it down / let it key again), ``floor`` with ``"talkgroup"`` and
``"mode": "mix" | "single"``, ``reload`` (re-read the site file, as SIGHUP does),
``link_cut`` with ``"link"`` (and optionally ``"share"`` and ``"reason"``) /
``link_restore`` (a sovereign cut of a cross-border link; audited with the sender
as who). Every command gets a reply, ``{"id", "ok": true}`` or ``{"id", "ok":
false, "error": "<reason>"}``.

The broker is optional and may come and go: the gateway never waits for it.
While it is away, events are kept in a bounded buffer (``buffer``) and sent on
reconnect; what overflows is counted in ``borderlink_mqtt_events_dropped_total``.
Reconnects back off exponentially between ``reconnect_min`` and ``reconnect_max``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from gateway.config import Model, readable_problem
from gateway.units import Duration

if TYPE_CHECKING:
    import aiomqtt  # imported when a site has [mqtt]: a gateway without it starts faster

    from gateway.app import Gateway
    from gateway.engine import Event

log = logging.getLogger(__name__)

Action = Literal[
    "patch", "unpatch", "unkey", "release", "floor", "reload", "link_cut", "link_restore"
]
ACTIONS: tuple[str, ...] = Action.__args__  # type: ignore[attr-defined]
MAX_COMMAND_BYTES = 4096
STATE_POLL_S = 1.0  # state that changes without an event (a port recovers) is seen this fast
STATE_MIN_S = 0.2  # and retained state is rebuilt at most this often
CONNECT_GRACE_S = 0.4  # a stop lets a connect in progress finish (the gateway allows 0.5 s)
TOPIC_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


class MqttConfig(Model):
    """``[mqtt]``: the broker, credentials, topics and who may command the gateway."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    site_id: str | None = Field(None, description="topic segment; default: the site name, slugged")
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: Duration = 30.0
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 60.0
    buffer: int = Field(1000, ge=1, description="events kept while the broker is away")
    qos: Literal[0, 1, 2] = 1
    commanders: dict[str, list[Action]] = {}

    def file_problems(self) -> list[tuple[tuple[str, ...], str]]:
        files = {k: getattr(self, k) for k in ("ca_file", "cert_file", "key_file", "password_file")}
        return [
            ((key,), problem)
            for key, path in files.items()
            if path is not None and (problem := readable_problem(path))
        ]

    def summary_lines(self) -> list[str]:
        """What ``borderlink check`` prints: the broker and who may command what."""
        secure = "TLS" if self.tls else "plain TCP"
        auth = f", user {self.username}" if self.username else ", no login"
        lines = [
            f"broker {self.host}:{self.port} ({secure}{auth}), topics borderlink/"
            f"{self.site_id or '<site name>'}/"
        ]
        for sender, actions in self.commanders.items():
            lines.append(f"commander {sender}: {', '.join(actions)}")
        if not self.commanders:
            lines.append("no commanders: state and events out only")
        return lines

    @field_validator("site_id")
    @classmethod
    def _site_id_is_a_topic_segment(cls, value: str | None) -> str | None:
        if value is not None and not TOPIC_SAFE.match(value):
            raise ValueError(
                "site_id must be letters, digits, '.', '_' or '-' (it is an MQTT topic level)"
            )
        return value

    @field_validator("commanders")
    @classmethod
    def _commanders_are_topic_segments(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for sender in value:
            if not TOPIC_SAFE.match(sender):
                raise ValueError(f"commander {sender!r}: use letters, digits, '.', '_' or '-' only")
        return value


def _close_socket(client: aiomqtt.Client) -> None:
    """Close the client's TCP connection now, while the event loop still runs.

    aiomqtt has no close of its own; paho's socket close also tells aiomqtt to stop
    watching the socket and to end its housekeeping task, so nothing of the client
    is left for the garbage collector to do."""
    paho = client._client
    if paho.socket() is not None:
        paho._sock_close()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "site"


def topic_level(name: str) -> str:
    """A name as one topic level: calls and links are named ``sip-6001#3``, and ``#``/``+``
    are MQTT wildcards (a publish to such a topic is refused, which ended the session)."""
    return re.sub(r"[#+/\x00]", "-", name)


class CommandError(Exception):
    """A command that is refused; the message is the reason sent back."""


class MqttService:
    def __init__(self, gateway: Gateway, config: MqttConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.site_id = config.site_id or slug(gateway.config.site.name)
        self.prefix = f"borderlink/{self.site_id}"
        self.events: deque[dict[str, Any]] = deque(maxlen=config.buffer)
        self.seq = 0
        self.connected = False
        self.connections = 0
        self.attempts = 0
        self.last_error = ""
        self.published_events = 0
        self.dropped = 0
        self.commands = {"accepted": 0, "rejected": 0, "unauthorised": 0}
        self._sender = ""  # the commander whose command runs now (a link cut audits it)
        self._published: dict[str, bytes] = {}  # retained topic → what the broker holds
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._client: aiomqtt.Client | None = None
        self._stopping = False

    # --- service ---------------------------------------------------------------------

    async def start(self) -> None:
        """Begin connecting in the background: the gateway never waits for the broker."""
        self._password = self._read_password()
        self.gateway.engine.listeners.append(self.on_event)
        self._task = asyncio.create_task(self._run(), name="mqtt")
        log.info(
            "MQTT: publishing under %s/ via %s:%d", self.prefix, self.config.host, self.config.port
        )

    async def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(ValueError):
            self.gateway.engine.listeners.remove(self.on_event)
        if self._client is not None and self.connected:
            with contextlib.suppress(Exception):
                await self._client.publish(
                    f"{self.prefix}/status", b"offline", qos=1, retain=True, timeout=0.3
                )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def stats(self) -> dict[str, Any]:
        return {
            "mqtt_connected": float(self.connected),
            "mqtt_reconnects": max(0, self.connections - 1),
            "mqtt_events_published": self.published_events,
            "mqtt_events_buffered": len(self.events),
            "mqtt_events_dropped": self.dropped,
            "mqtt_commands": dict(self.commands),
        }

    def _read_password(self) -> str | None:
        cfg = self.config
        if cfg.password_file is not None:
            try:
                return cfg.password_file.read_text().strip()
            except OSError as exc:
                raise RuntimeError(
                    f"[mqtt] password_file {cfg.password_file}: {exc.strerror}; "
                    "create it (one line, the broker password) or remove the key"
                ) from exc
        if cfg.password_env is not None:
            if cfg.password_env not in os.environ:
                raise RuntimeError(f"[mqtt] password_env: ${cfg.password_env} is not set")
            return os.environ[cfg.password_env]
        return None

    # --- events (called inside the tick: append and return) ----------------------------

    def on_event(self, event: Event) -> None:
        message: dict[str, Any] = {"event": event.kind}
        if event.port is not None:
            message["port"] = event.port
            message["talkgroup"] = self._talkgroup(event.port)
            if event.label and event.label != event.port:
                message["label"] = event.label
        if event.group:
            message["mix_group"] = event.group
        if event.kind in ("talk_start", "talk_stop"):
            message["talker"] = event.talker or event.port  # a link: the far side's label
        if event.talker and event.kind in ("floor_granted", "preempted", "talker_named"):
            message["talker"] = event.talker
        if event.kind == "ptt_on":
            # Who is heard is settled later in the same tick: fill it in right after,
            # before the publisher wakes.
            message["talkers"] = []
            stored = self._queue(message, wake=False)
            try:
                asyncio.get_running_loop().call_soon(self._fill_talkers, stored, event.group)
            except RuntimeError:  # ticked outside a loop (tools, tests): do it now
                self._fill_talkers(stored, event.group)
            return
        if event.kind in ("talk_stop", "ptt_off", "left"):
            message["seconds"] = round(event.seconds, 3)
        if event.kind in ("joined", "left"):  # a left port's talkgroup is only in the event
            message.update(talkgroup=event.talkgroup, kind=event.detail)
        elif event.kind == "patch":
            patch, _, state = event.detail.partition(" ")
            message.update(patch=patch, active=state == "on")
        elif event.detail:
            message["detail"] = event.detail
        self._queue(message)

    def _queue(self, message: dict[str, Any], wake: bool = True) -> dict[str, Any]:
        self.seq += 1
        message = {"seq": self.seq, "ts": round(time.time(), 3), **message}
        if len(self.events) == self.events.maxlen:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "MQTT event buffer full (%d): %d events dropped so far",
                    self.events.maxlen,
                    self.dropped,
                )
        self.events.append(message)
        if wake:
            self._wake.set()
        return message

    def _fill_talkers(self, message: dict[str, Any], group: str | None) -> None:
        message["talkers"] = self._talkers(group)
        self._wake.set()

    def _talkgroup(self, port: str) -> str | None:
        engine = self.gateway.engine
        if port in engine.attached:
            return engine.attached[port][0]
        return self.gateway.config.talkgroup_of(port)

    def _talkers(self, group: str | None) -> list[str]:
        layout = self.gateway.engine.layout
        admitted = self.gateway.engine.admitted
        names = [g.name for g in layout.groups]
        if group not in names or len(admitted) != len(layout.ports):
            return []
        rows = np.flatnonzero(admitted & (layout.group_of == names.index(group)))
        engine = self.gateway.engine
        return [engine.talker_of(i) or layout.ports[i].name for i in rows.tolist()]

    # --- state ---------------------------------------------------------------------------

    def state(self) -> dict[str, dict[str, Any]]:
        """Retained topic → JSON-able state, for ports, talkgroups and patches."""
        engine = self.gateway.engine
        layout = engine.layout
        tick = engine.tick_count
        out: dict[str, dict[str, Any]] = {}
        talkers: dict[str, list[str]] = {}
        members: dict[str, list[str]] = {}
        for i, port in enumerate(layout.ports):
            tg = layout.talkgroup[i]
            health = engine.health.get(port.name)
            up = not (health is not None and health.down_until_tick > tick)
            talking, keyed = bool(engine.admitted[i]), bool(engine.keying.keyed[i])
            out[f"state/ports/{topic_level(port.name)}"] = {
                "kind": port.kind,
                "talkgroup": tg,
                "agency": getattr(port.config, "agency", ""),
                "label": getattr(port, "label", port.name),
                "up": up,
                "talking": talking,
                "keyed": keyed,
                "tx_inhibit": port.name in engine.tx_inhibit,
            }
            if tg is not None:
                members.setdefault(tg, []).append(port.name)
                if talking:
                    talkers.setdefault(tg, []).append(port.name)
        group_of_tg = {tg: g for g in layout.groups for tg in g.talkgroups}
        for name, tg in engine.talkgroups.items():
            group = group_of_tg.get(name)
            out[f"state/talkgroups/{name}"] = {
                "members": members.get(name, []),
                "floor": group.floor if group else tg.floor,
                "mix_group": group.name if group else name,
                "patched": bool(group and group.patched),
                "talkers": talkers.get(name, []),
            }
        for name, patch in engine.patches.items():
            out[f"state/patches/{name}"] = {
                "talkgroups": list(patch.talkgroups),
                "active": name in engine.active_patches,
            }
        return out

    async def _publish_state(self, client: aiomqtt.Client) -> None:
        """Publish retained state that changed; clear topics of ports that left."""
        state = self.state()
        current = {
            f"{self.prefix}/{topic}": json.dumps(value, separators=(",", ":")).encode()
            for topic, value in state.items()
        }
        for topic in [t for t in self._published if t not in current]:
            await client.publish(topic, b"", qos=self.config.qos, retain=True)  # clears it
            del self._published[topic]
        for topic, payload in current.items():
            if self._published.get(topic) != payload:
                await client.publish(topic, payload, qos=self.config.qos, retain=True)
                self._published[topic] = payload

    # --- connection ---------------------------------------------------------------------

    def _client_for(self) -> aiomqtt.Client:
        import aiomqtt

        cfg = self.config
        tls = None
        if cfg.tls or cfg.ca_file:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                certfile=str(cfg.cert_file) if cfg.cert_file else None,
                keyfile=str(cfg.key_file) if cfg.key_file else None,
            )
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=self._password,
            identifier=cfg.client_id or f"borderlink-{self.site_id}",
            keepalive=max(5, round(cfg.keepalive)),
            tls_params=tls,
            timeout=5,
            will=aiomqtt.Will(f"{self.prefix}/status", b"offline", qos=1, retain=True),
        )

    async def _run(self) -> None:
        import aiomqtt

        backoff = self.config.reconnect_min
        while not self._stopping:
            self.attempts += 1
            try:
                async with self._connection() as client:
                    self._client = client
                    self.connected = True
                    self.connections += 1
                    backoff = self.config.reconnect_min
                    log.info("MQTT connected to %s:%d", self.config.host, self.config.port)
                    await self._session(client)
            except (aiomqtt.MqttError, OSError) as exc:
                self.last_error = str(exc)
                if self.connected:
                    log.warning("MQTT connection lost: %s", exc)
                else:
                    log.warning(
                        "MQTT broker %s:%d unreachable: %s (retry in %.1fs)",
                        self.config.host,
                        self.config.port,
                        exc,
                        backoff,
                    )
            finally:
                self.connected = False
                self._client = None
            if self._stopping:
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.reconnect_max)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiomqtt.Client]:
        """One connection to the broker, its socket closed on the way out whatever happens.

        aiomqtt closes nothing when its connect fails after the TCP connection is up
        (no CONNACK in time, cancelled by a stop): a socket left open keeps the broker's
        session alive, and the garbage collector closing it later calls into an event
        loop that may be gone (``Exception ignored in Client.__del__ ... Event loop is
        closed``). A clean end sends DISCONNECT first (so the broker drops our will)."""
        import aiomqtt

        client = self._client_for()
        try:
            await self._connect(client)
            try:
                yield client
            finally:
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.__aexit__(None, None, None)
        finally:
            _close_socket(client)

    @staticmethod
    async def _connect(client: aiomqtt.Client) -> None:
        """aiomqtt's connect, safe to stop in the middle.

        aiomqtt runs the blocking TCP/TLS connect in a worker thread. Cancelled, it
        abandons that thread, whose socket then opens after the stop and is nobody's
        to close. A thread cannot be interrupted, so a stop lets it finish (for up to
        CONNECT_GRACE_S) and the caller then closes what it opened."""
        connecting = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.shield(connecting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(connecting, CONNECT_GRACE_S)
            raise

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.publish(f"{self.prefix}/status", b"online", qos=1, retain=True)
        # A restarted broker has lost our retained state: send all of it again
        # (and clear what it may still hold for ports that left meanwhile).
        self._published = dict.fromkeys(self._published, b"?")
        await client.subscribe(f"{self.prefix}/command/+", qos=self.config.qos)
        tasks = {
            asyncio.create_task(self._read_commands(client), name="mqtt-commands"),
            asyncio.create_task(self._write(client), name="mqtt-publish"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:  # the connection error that ended the session, if any
            if isinstance(result, Exception):
                raise result

    async def _write(self, client: aiomqtt.Client) -> None:
        """Events as they come; retained state at most every STATE_MIN_S, at least every
        STATE_POLL_S (building it walks every port, so a burst of events does not
        rebuild it each time)."""
        loop = asyncio.get_running_loop()
        next_state = 0.0
        while True:
            await self._send_events(client)
            state_due = loop.time() >= next_state
            if state_due:
                await self._publish_state(client)
                next_state = loop.time() + STATE_MIN_S
                await self._send_events(client)  # joined/left found by the state
            self._wake.clear()
            wait = STATE_POLL_S if state_due else max(0.0, next_state - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _send_events(self, client: aiomqtt.Client) -> None:
        while self.events:
            message = self.events[0]  # removed only once the broker has it
            topic = f"{self.prefix}/event/{message['event']}"
            payload = json.dumps(message, separators=(",", ":")).encode()
            await client.publish(topic, payload, qos=self.config.qos)
            if self.events and self.events[0] is message:
                self.events.popleft()
            self.published_events += 1

    # --- commands -------------------------------------------------------------------------

    async def _read_commands(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            sender = message.topic.value.rsplit("/", 1)[-1]
            payload = message.payload if isinstance(message.payload, bytes) else b""
            reply = await self.handle_command(sender, payload)
            await client.publish(
                f"{self.prefix}/reply/{sender}",
                json.dumps(reply, separators=(",", ":")).encode(),
                qos=self.config.qos,
            )
            self._wake.set()

    async def handle_command(self, sender: str, payload: bytes) -> dict[str, Any]:
        """Authorise, check and carry out one command; the reply says what happened."""
        command_id: Any = None
        action: Any = None
        allowed = self.config.commanders.get(sender)
        try:
            command = self._parse(payload)
            command_id, action = command.get("id"), command.get("action")
            if action not in ACTIONS:
                raise CommandError(f"unknown action {action!r}; use one of: {', '.join(ACTIONS)}")
            if allowed is None or action not in allowed:
                if allowed is None:
                    why = f"sender {sender!r} is not in [mqtt.commanders]"
                else:
                    why = f"sender {sender!r} may not {action!r} (allowed: {', '.join(allowed)})"
                self.commands["unauthorised"] += 1
                self._audit(sender, action, command_id, False, reason=why)
                return {
                    "id": command_id,
                    "ok": False,
                    "action": action,
                    "error": f"not authorised: {why}",
                }
            self._sender = sender[:64]
            if action == "reload":
                result, change = await self._reload(sender, _ref(command_id))
            else:
                result, change = self._execute(action, command)
        except CommandError as exc:
            self.commands["rejected"] += 1
            self._audit(sender, action, command_id, False, reason=str(exc))
            return {"id": command_id, "ok": False, "action": action, "error": str(exc)}
        self.commands["accepted"] += 1
        self._audit(sender, action, command_id, True, **change)
        return {"id": command_id, "ok": True, "action": action, **result}

    @staticmethod
    def _parse(payload: bytes) -> dict[str, Any]:
        if len(payload) > MAX_COMMAND_BYTES:
            raise CommandError(f"command is {len(payload)} bytes; the limit is {MAX_COMMAND_BYTES}")
        try:
            command = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            example = '{"id": "1", "action": "patch", "patch": "NAME"}'
            raise CommandError(
                f"not valid JSON ({exc}); send an object such as {example}"
            ) from None
        if not isinstance(command, dict):
            raise CommandError("a command must be a JSON object with an 'action'")
        return command

    def _execute(
        self, action: str, command: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Carry out a command: (the reply's fields, the audit record's target and
        old → new state). Names in either are config names, checked here."""
        engine = self.gateway.engine

        def field(name: str, choices: Any) -> str:
            value = command.get(name)
            if not isinstance(value, str) or not value:
                raise CommandError(f"{action!r} needs {name!r} (one of: {', '.join(choices)})")
            if value not in choices:
                raise CommandError(f"no {name} named {value!r}; configured: {', '.join(choices)}")
            return value

        try:
            if action in ("patch", "unpatch"):
                patch = field("patch", engine.patches)
                old = "on" if patch in engine.active_patches else "off"
                engine.set_patch(
                    patch, action == "patch", by=f"mqtt:{self._sender}", ref=_ref(command.get("id"))
                )
                on = patch in engine.active_patches
                return {"patch": patch, "active": on}, {
                    "patch": patch,
                    "old": old,
                    "new": "on" if on else "off",
                }
            if action in ("unkey", "release"):
                port = field("port", [p.name for p in engine.ports])
                old = "inhibited" if port in engine.tx_inhibit else "allowed"
                engine.set_tx_inhibit(port, action == "unkey")
                held = port in engine.tx_inhibit
                return {"port": port, "tx_inhibit": held}, {
                    "port": port,
                    "talkgroup": self._talkgroup(port),
                    "old": old,
                    "new": "inhibited" if held else "allowed",
                }
            if action in ("link_cut", "link_restore"):
                return self._link(action, command)
            talkgroup = field("talkgroup", engine.talkgroups)
            mode = field("mode", ("mix", "single"))
            old = engine.talkgroups[talkgroup].floor
            engine.set_floor_mode(talkgroup, mode)
            return {"talkgroup": talkgroup, "mode": mode}, {
                "talkgroup": talkgroup,
                "old": old,
                "new": mode,
            }
        except (KeyError, ValueError) as exc:  # the engine refused it
            raise CommandError(str(exc).strip("'\"")) from None

    async def _reload(self, sender: str, ref: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Re-read the site file, as SIGHUP does; the reply says what changed or why not."""
        outcome = await self.gateway.reload_live(by=f"mqtt:{sender[:64]}", ref=ref)
        if not outcome.ok:
            raise CommandError(f"reload refused, the running config stays: {outcome.error}")
        return {"changes": outcome.summary}, {"changes": outcome.summary}

    def _link(self, action: str, command: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        from gateway.links.errors import LinkError

        links = getattr(self.gateway, "links", None)
        if links is None:
            raise CommandError("this site has no [links]")
        link, share, reason = command.get("link"), command.get("share"), command.get("reason")
        if not isinstance(link, str) or (share is not None and not isinstance(share, str)):
            raise CommandError(f"{action!r} needs 'link' (and optionally 'share') as strings")
        who = f"mqtt:{self._sender}"
        trunk = links.trunks.get(link)
        old = None  # the state before, for the audit: the link's, or the shared name's
        if trunk is not None:
            old = trunk.names[share].state if share in trunk.names else trunk.state()
        try:
            if action == "link_cut":
                done = links.cut(link, share, who, str(reason or "")[:200], "mqtt")
            else:
                done = links.restore(link, share, who, "mqtt")
        except LinkError as exc:
            raise CommandError(str(exc)) from None
        new = trunk.names[share].state if trunk is not None and share in trunk.names else None
        return done, {"link": link, "share": share, "old": old, "new": new or done["state"]}

    def _audit(self, sender: str, action: Any, command_id: Any, ok: bool, **fields: Any) -> None:
        """One ``command`` record: who (sender), what (action, target, old → new), the
        command's id (the commander's own reference, cut to 64 characters)."""
        audit = getattr(self.gateway, "audit", None)
        if audit is not None:
            what = str(action)[:32] if action else None
            audit.record(
                "command",
                via="mqtt",
                sender=sender[:64],
                action=what,
                id=_ref(command_id),
                ok=ok,
                **fields,
            )


def _ref(command_id: Any) -> str | None:
    """A command's id as the audit log keeps it: the commander's reference, cut to 64."""
    return None if command_id is None else str(command_id)[:64]
