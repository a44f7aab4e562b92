"""The composition root: every kind of endpoint a site can use, in one table.

A site file names port kinds (``kind = "soundcard"``) and optional top-level sections
(``[sip]``, ``[console]``...). This table says, per endpoint, which config model reads
them, which Port class a port kind builds, which service runs for a section, which
routes it adds to the ``[web]`` server and which ``borderlink`` commands it brings.
Nothing registers itself on import: to add an endpoint, add a row here.

Parts are named ``"module:attribute"`` and imported when first needed, so
``borderlink --version`` loads no NumPy, aiortc or cryptography, and a site without
a ``[console]`` never loads aiortc. A test may give its own rows (a part may then be
the object itself) to :func:`gateway.config.parse_config`; the parsed site carries
them to the Gateway, which builds its ports and services from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

Ref = Any
"""A part of an endpoint: ``"package.module:attribute"``, or the object itself."""


def load(ref: Ref) -> Any:
    """The object a ``"module:attribute"`` names (imported now), or ``ref`` itself."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(import_module(module), attribute)


@dataclass(frozen=True)
class Command:
    """A ``borderlink NAME`` subcommand: ``arguments(parser)`` adds its options,
    ``handler(args)`` runs it and returns the exit status."""

    name: str
    help: str
    arguments: Ref
    handler: Ref


@dataclass(frozen=True)
class Endpoint:
    """One kind of thing a site can have. Every field is optional.

    ``section``: the top-level table it owns, read by the model ``config``; when the
    site has it, ``service(gateway, section_config)`` runs beside the engine and is
    kept as ``gateway.<section>`` (when it does not, ``missing`` is logged, if set).
    ``ports``: port kind → (config model, Port class). ``routes``: installers
    ``(web.Application, Gateway)`` run when the ``[web]`` server starts, and only
    when the site has this endpoint's section (if it owns one).
    """

    name: str
    section: str = ""
    config: Ref = None
    service: Ref = None
    missing: str = ""
    ports: dict[str, tuple[Ref, Ref]] = field(default_factory=dict)
    routes: tuple[Ref, ...] = ()
    commands: tuple[Command, ...] = ()


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "simulated",  # no hardware: radios on a schedule, test tones, WAV files
        ports={
            "simulated_radio": (
                "gateway.config:SimulatedRadioConfig",
                "gateway.ports:SimulatedRadio",
            ),
            "tone": ("gateway.config:ToneSourceConfig", "gateway.ports:ToneSource"),
            "file": ("gateway.config:FileSourceConfig", "gateway.ports:FileSource"),
        },
    ),
    Endpoint(
        "recorder",  # a talkgroup's audio to WAV files
        ports={"recorder": ("gateway.config:RecorderConfig", "gateway.recorder:Recorder")},
    ),
    Endpoint(
        "radio",  # sound-card radios with PTT and squelch lines
        ports={"soundcard": ("gateway.radio:SoundcardConfig", "gateway.radio:SoundcardPort")},
        commands=(
            Command(
                "devices",
                "list sound cards and the serial/HID/GPIO lines that could key a radio",
                "gateway.radio_cli:devices_arguments",
                "gateway.radio_cli:devices",
            ),
            Command(
                "levels",
                "live input/output meters and squelch/PTT state of one radio port",
                "gateway.radio_cli:levels_arguments",
                "gateway.radio_cli:levels",
            ),
            Command(
                "unkey",
                "drive every PTT line the site names unkeyed, then exit (safe at any time)",
                "gateway.radio_cli:config_argument",
                "gateway.radio_cli:unkey",
            ),
        ),
    ),
    Endpoint(
        "audit",  # PTT, patches, calls and logins to an append-only file
        section="audit",
        config="gateway.audit:AuditConfig",
        service="gateway.audit:AuditLog",
        missing="no [audit] section: PTT, patch, call and login records are not kept",
    ),
    Endpoint(
        "sip",  # phones and PBXs
        section="sip",
        config="gateway.sip.config:SipConfig",
        service="gateway.sip.service:SipService",
    ),
    Endpoint(
        "links",  # cross-border trunks; runs on the SIP service, so it starts after it
        section="links",
        config="gateway.links.config:LinksConfig",
        service="gateway.links.service:LinksService",
        commands=(
            Command(
                "link",
                "cut, restore or show a cross-border link of the running gateway",
                "gateway.links.control:link_arguments",
                "gateway.links.control:link",
            ),
        ),
    ),
    Endpoint(
        "web",  # the one web server; the console and monitoring add their routes to it
        section="web",
        config="gateway.web:WebConfig",
        service="gateway.web:WebServer",
    ),
    Endpoint(
        "monitoring",  # /metrics, /healthz, /readyz on [web]
        routes=("gateway.monitoring.exporter:install",),
    ),
    Endpoint(
        "mqtt",  # state, events and commands for CAD systems
        section="mqtt",
        config="gateway.mqtt:MqttConfig",
        service="gateway.mqtt:MqttService",
    ),
    Endpoint(
        "console",  # the browser dispatcher console (WebRTC), served by [web]
        section="console",
        config="gateway.webrtc.config:ConsoleConfig",
        routes=("gateway.webrtc.server:install",),
        commands=(
            Command(
                "passwd",
                "print a password hash for a console operator "
                "([console.operators.NAME]) or, with --sip USER, a SIP caller",
                "gateway.webrtc.passwords:passwd_arguments",
                "gateway.webrtc.passwords:passwd",
            ),
        ),
    ),
)


def sections(endpoints: tuple[Endpoint, ...]) -> dict[str, Ref]:
    """Top-level table name → its config model (not imported yet)."""
    return {e.section: e.config for e in endpoints if e.section}


def port_kinds(endpoints: tuple[Endpoint, ...]) -> dict[str, tuple[Ref, Ref]]:
    """Port kind → (config model, Port class), neither imported yet."""
    return {kind: parts for e in endpoints for kind, parts in e.ports.items()}


def commands(endpoints: tuple[Endpoint, ...]) -> list[Command]:
    return [command for e in endpoints for command in e.commands]
