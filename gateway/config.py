"""Site configuration: one TOML file → typed, validated models.

A dispatcher edits this file under pressure, so every problem is reported at once,
each with the file, the key path, the line where it can be found, and the fix.
Unknown keys are errors: a misspelt ``hangtime`` must not silently fall back to a
default. The port kinds and sections a file may use, and their models, come from
the endpoint table (:mod:`gateway.endpoints`), so an endpoint adds its own models
without touching this module.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.endpoints import ENDPOINTS, Endpoint, load, port_kinds, sections
from gateway.units import Duration

FloorMode = Literal["mix", "single"]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteInfo(Model):
    name: str = Field(min_length=1)
    country: str
    description: str = ""

    @field_validator("country")
    @classmethod
    def _iso_country(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Z]{2}", value):
            raise ValueError(f"use the two-letter ISO 3166 code, e.g. 'CA' or 'US', not {value!r}")
        return value


class Timing(Model):
    frame: Duration = 0.020
    rate: Literal[8000, 16000, 32000, 48000] = 16000

    @field_validator("frame")
    @classmethod
    def _frame_is_10_or_20_ms(cls, value: float) -> float:
        if round(value * 1000) not in (10, 20):
            raise ValueError("the engine frame must be '10ms' or '20ms'")
        return round(value * 1000) / 1000

    @property
    def frame_samples(self) -> int:
        return round(self.rate * self.frame)


class PortConfig(Model):
    """What every port has, whatever its kind. Kinds subclass it (see gateway.endpoints)."""

    kind: str
    agency: str = ""
    label: str = Field("", max_length=40)  # the unit name people see ("USCG 45612")
    description: str = ""
    enabled: bool = True
    rx_gain_db: float = Field(0.0, ge=-60, le=40)
    tx_gain_db: float = Field(0.0, ge=-60, le=40)
    duplex: Literal["half", "full"] | None = None
    ptt_hang_time: Duration = 0.5
    tot: Duration = 180.0
    anti_kerchunk: Duration = 0.0

    default_duplex: ClassVar[str] = "full"

    @property
    def half_duplex(self) -> bool:
        return (self.duplex or self.default_duplex) == "half"


class TalkSchedule(Model):
    """Scripted talk bursts for simulated sources: talk `talk_for` every `talk_every`."""

    talk_every: Duration = 0.0
    talk_for: Duration = 0.0
    talk_offset: Duration = 0.0

    @property
    def talks_always(self) -> bool:
        return self.talk_every == 0 and self.talk_for == 0


class ScheduledSource(PortConfig, TalkSchedule):
    """A tone or file played on purpose. One with no schedule talks all the time, which is
    what its author asked for: the 3-minute TOT (meant for a stuck microphone) would cut
    it for good, so such a source has no TOT unless ``tot`` is written."""

    @model_validator(mode="after")
    def _no_tot_when_always_on(self) -> ScheduledSource:
        if self.talks_always and "tot" not in self.model_fields_set:
            object.__setattr__(self, "tot", 0.0)
        return self


class SimulatedRadioConfig(PortConfig, TalkSchedule):
    """A radio that needs no hardware: talks on a schedule, half duplex like a real one."""

    default_duplex: ClassVar[str] = "half"
    audio: Literal["tone", "speech"] = "tone"
    tone_hz: float = Field(1000.0, gt=0, le=4000)
    level_dbfs: float = Field(-12.0, le=0)
    voice: Path | None = None  # a 16-bit WAV said from its start at every talk burst


class ToneSourceConfig(ScheduledSource):
    tone_hz: float = Field(1000.0, gt=0, le=20000)
    level_dbfs: float = Field(-12.0, le=0)


class FileSourceConfig(ScheduledSource):
    path: Path
    loop: bool = True


class RecorderConfig(PortConfig):
    """Recordings go to new files in ``directory``, named after the talkgroup and the
    UTC time they start; an existing file is never written over."""

    directory: Path
    split: Literal["over", "hour"] = "hour"
    continuous: bool = True  # hour files: silence between overs too, so they keep real time
    over_gap: Duration = 2.0  # split = "over": this much silence ends an over's file
    keep_days: int = Field(0, ge=0)  # delete this talkgroup's recordings older; 0 keeps all

    @model_validator(mode="before")
    @classmethod
    def _path_is_now_directory(cls, data: Any) -> Any:
        if isinstance(data, dict) and "path" in data:
            raise ValueError(
                "recorders no longer write one file (a restart wrote over it): write "
                'directory = "<folder>" instead of path; each start, hour (or over, '
                'split = "over") gets a new file named after the talkgroup and UTC time'
            )
        return data


class TalkgroupConfig(Model):
    members: list[str] = Field(min_length=1)
    floor: FloorMode = "mix"
    priority: dict[str, int] = {}
    courtesy_tone: bool = False
    talk_permit_tone: bool = False
    # Keep the last overs this long in memory for consoles to replay (0: off, as privacy
    # asks by default); at most 1 h.
    instant_recall: Duration = 0.0
    description: str = ""

    @field_validator("instant_recall")
    @classmethod
    def _recall_bounded(cls, value: float) -> float:
        if not 0 <= value <= 3600:
            raise ValueError('instant_recall must be between 0 (off) and 1h, e.g. "10min"')
        return value


class PatchConfig(Model):
    talkgroups: list[str] = Field(min_length=2)
    floor: FloorMode | None = None
    enabled: bool = True
    description: str = ""


@dataclass(frozen=True)
class SiteConfig:
    site: SiteInfo
    timing: Timing
    ports: dict[str, PortConfig]
    talkgroups: dict[str, TalkgroupConfig]
    patches: dict[str, PatchConfig]
    sections: dict[str, Model] = field(default_factory=dict)
    source: Path | None = None
    # What the file was read with; the Gateway builds its ports and services from it.
    endpoints: tuple[Endpoint, ...] = field(default=ENDPOINTS, compare=False, repr=False)

    def section(self, name: str) -> Any:
        """An optional section's model (``[sip]``...), or None when the file has none."""
        return self.sections.get(name)

    def talkgroup_of(self, port: str) -> str | None:
        for name, tg in self.talkgroups.items():
            if port in tg.members:
                return name
        return None


def describe_changes(old: SiteConfig, new: SiteConfig) -> list[str]:
    """What a reload changes, beyond ports, in words for its log line and result.

    ``["talkgroups +tg2", "sip: routes +7001 -6001 ~8001, accounts ~marine"]``: a
    table of named entries says which names came, went or changed; any other key
    just its name. Names only, never values: a new password shows as ``~marine``.
    One function for every section, so a service need not report its own changes.
    """
    out = [
        f"{table} {words}"
        for table in ("talkgroups", "patches")
        if (words := _named_changes(getattr(old, table), getattr(new, table)))
    ]
    for name in [*new.sections, *(n for n in old.sections if n not in new.sections)]:
        before, after = old.section(name), new.section(name)
        if before == after:
            continue
        if before is None or after is None:
            out.append(f"{name}: {'added' if before is None else 'removed'}")
            continue
        keys = []
        for key in type(after).model_fields:
            a, b = getattr(before, key), getattr(after, key)
            if a != b:
                both_tables = isinstance(a, dict) and isinstance(b, dict)
                keys.append(f"{key} {_named_changes(a, b)}" if both_tables else key)
        out.append(f"{name}: {', '.join(keys)}")
    return out


def _named_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    words = [f"+{k}" for k in new if k not in old]
    words += [f"-{k}" for k in old if k not in new]
    words += [f"~{k}" for k in new if k in old and old[k] != new[k]]
    return " ".join(words)


@dataclass
class Problem:
    path: str
    message: str
    line: int | None = None

    def render(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line else file
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.message}"


@dataclass
class ConfigError(Exception):
    file: str
    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        count = len(self.problems)
        head = f"{self.file}: {count} problem{'s' if count != 1 else ''} in the site config"
        return "\n".join([head, *("  " + p.render(self.file) for p in self.problems)])


def writable_problem(directory: Path) -> str:
    """Why files could not be written in ``directory`` ("" if they can, or it can be made)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing}: this user may not write there (chown it, or pick another directory)"
    return ""


def readable_problem(path: Path) -> str:
    """Why ``path`` could not be read ("" if it can)."""
    try:
        with open(path, "rb"):
            return ""
    except FileNotFoundError:
        return f"{path}: no such file"
    except OSError as exc:
        return f"{path}: cannot read it ({exc.strerror or exc})"


def load_config(path: str | Path, endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> SiteConfig:
    """Read and validate a site file; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            str(path), [Problem("", f"cannot read the file: {exc.strerror}")]
        ) from exc
    config = parse_config(text, str(path), endpoints)
    return SiteConfig(**{**config.__dict__, "source": path})


def parse_config(
    text: str, filename: str = "<config>", endpoints: tuple[Endpoint, ...] = ENDPOINTS
) -> SiteConfig:
    """Validate a site file's text against the port kinds and sections of ``endpoints``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _line_of_decode_error(str(exc))
        raise ConfigError(
            filename, [Problem("", f"not valid TOML: {exc}. Check quotes and brackets.", line)]
        ) from exc
    lines = key_lines(text)
    problems: list[Problem] = []
    models = sections(endpoints)
    known = ["site", "timing", "ports", "talkgroups", "patches", *models]
    for key in raw:
        if key not in known:
            hint = _did_you_mean(key, known) or f" (top-level tables: {', '.join(known)})"
            problems.append(_problem((key,), f"unknown table{hint}", lines))

    def check(model: type[Model], value: Any, where: tuple[str, ...]) -> Any:
        """Validate one part; a bad part is reported and the rest still checked."""
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            problems.extend(_problems_from(exc, where, model, lines))
            return None

    if "site" not in raw:
        problems.append(
            Problem("site", "required table is missing: add [site] with name and country")
        )
    site = check(SiteInfo, raw.get("site", {}), ("site",))
    timing = check(Timing, raw.get("timing", {}), ("timing",))
    found = {}
    for name, model in models.items():
        if name in raw:
            found[name] = check(load(model), raw[name], (name,))
    tables = {}
    for table in ("ports", "talkgroups", "patches"):
        value = raw.get(table, {})
        if not isinstance(value, dict):
            problems.append(_problem((table,), f"must be tables: [{table}.NAME]", lines))
            value = {}
        tables[table] = value
    ports: dict[str, PortConfig] = {}
    kinds = {kind: model for kind, (model, _) in port_kinds(endpoints).items()}
    for name, table in tables["ports"].items():
        port = _validate_port(name, table, kinds, lines, problems)
        if port is not None:
            ports[name] = port
    talkgroups = {
        n: check(TalkgroupConfig, t, ("talkgroups", n)) for n, t in tables["talkgroups"].items()
    }
    patches = {n: check(PatchConfig, p, ("patches", n)) for n, p in tables["patches"].items()}
    problems.extend(
        _cross_check(
            set(tables["ports"]),
            {n: t for n, t in talkgroups.items() if t is not None},
            set(tables["talkgroups"]),
            {n: p for n, p in patches.items() if p is not None},
            ports,
            lines,
        )
    )
    problems.extend(_section_references(found, set(tables["talkgroups"]), lines))
    if problems:
        raise ConfigError(filename, problems)
    return SiteConfig(site, timing, ports, talkgroups, patches, found, endpoints=endpoints)


def _validate_port(
    name: str,
    table: Any,
    kinds: dict[str, Any],
    lines: dict[tuple[str, ...], int],
    problems: list[Problem],
) -> PortConfig | None:
    where = ("ports", name)
    if not isinstance(table, dict):
        problems.append(_problem(where, "must be a table: [ports.NAME]", lines))
        return None
    kind = table.get("kind")
    model = load(kinds[kind]) if isinstance(kind, str) and kind in kinds else None
    if model is None:
        known = ", ".join(sorted(kinds))
        what = "missing" if kind is None else f"unknown port kind {kind!r}"
        hint = _did_you_mean(kind, kinds) if isinstance(kind, str) else ""
        problems.append(_problem((*where, "kind"), f"{what}; known kinds: {known}{hint}", lines))
        return None
    try:
        return model.model_validate(table)
    except ValidationError as exc:
        problems.extend(_problems_from(exc, where, model, lines))
        return None


def _cross_check(
    port_names: set[str],
    talkgroups: dict[str, TalkgroupConfig],
    talkgroup_names: set[str],
    patches: dict[str, PatchConfig],
    ports: dict[str, PortConfig],
    lines: dict[tuple[str, ...], int],
) -> list[Problem]:
    problems: list[Problem] = []
    home: dict[str, str] = {}
    for tg_name, tg in talkgroups.items():
        at = ("talkgroups", tg_name, "members")
        for member in tg.members:
            if member not in port_names:
                names = ", ".join(sorted(port_names))
                hint = _did_you_mean(member, port_names) or f" (ports: {names})"
                problems.append(_problem(at, f"no port named {member!r}{hint}", lines))
            elif member in home:
                problems.append(
                    _problem(
                        at,
                        (
                            f"port {member!r} is already a member of talkgroup {home[member]!r}; "
                            "a port carries one talkgroup. To let two talkgroups hear each other, "
                            "patch them."
                        ),
                        lines,
                    )
                )
            else:
                home[member] = tg_name
        for member in tg.priority:
            if member not in tg.members:
                problems.append(
                    _problem(
                        ("talkgroups", tg_name, "priority"),
                        f"{member!r} has a priority but is not in members; add it or remove it",
                        lines,
                    )
                )
    for patch_name, patch in patches.items():
        at = ("patches", patch_name, "talkgroups")
        for tg in patch.talkgroups:
            if tg not in talkgroup_names:
                names = ", ".join(sorted(talkgroup_names))
                hint = _did_you_mean(tg, talkgroup_names) or f" (talkgroups: {names})"
                problems.append(_problem(at, f"no talkgroup named {tg!r}{hint}", lines))
        if len(set(patch.talkgroups)) != len(patch.talkgroups):
            problems.append(_problem(at, "names a talkgroup twice", lines))
    for name, port in ports.items():
        if port.tot and port.ptt_hang_time >= port.tot:
            problems.append(
                _problem(
                    ("ports", name, "ptt_hang_time"),
                    "is longer than the port's tot; a transmitter would time out in its hang time",
                    lines,
                )
            )
    return problems


def _section_references(
    sections: dict[str, Model | None],
    talkgroup_names: set[str],
    lines: dict[tuple[str, ...], int],
) -> list[Problem]:
    """Talkgroup names used by other sections (SIP routes, console operators) must exist.

    A section model opts in with ``talkgroup_references()``, returning (key path inside
    the section, talkgroup name) pairs. Checking them here means ``borderlink check``
    and a reload refuse a typo before a service starts and rejects calls with it.
    """
    problems: list[Problem] = []
    for section_name, model in sections.items():
        # A section that needs another one (links run on [sip] TLS) says what is missing.
        needs = getattr(model, "section_problems", None)
        if model is not None and needs is not None:
            for path, message in needs(sections):
                problems.append(_problem((section_name, *path), message, lines))
        references = getattr(model, "talkgroup_references", None)
        if model is None or references is None:
            continue
        for path, name in references():
            if name not in talkgroup_names:
                known = ", ".join(sorted(talkgroup_names)) or "none configured"
                hint = _did_you_mean(name, talkgroup_names) or f" (talkgroups: {known})"
                problems.append(
                    _problem((section_name, *path), f"no talkgroup named {name!r}{hint}", lines)
                )
    return problems


# --- error reporting -------------------------------------------------------------


def _problems_from(
    exc: ValidationError, prefix: tuple[str, ...], model: type[BaseModel], lines: dict
) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = (*prefix, *(str(part) for part in error["loc"]))
        kind = error["type"]
        if kind == "extra_forbidden":
            known = _fields_at(model, [str(p) for p in error["loc"][:-1]])
            hint = _did_you_mean(str(error["loc"][-1]), known)
            if not hint and known:
                hint = f" (allowed here: {', '.join(sorted(known))})"
            message = f"unknown key{hint}"
        elif kind == "missing":
            message = "required key is missing"
        else:
            message = error["msg"].removeprefix("Value error, ")
            value = error.get("input")
            # Not for a whole table: it says nothing the key path does not, and may hold
            # secrets (hashes); nor when the message already names the value.
            shown = value is None or isinstance(value, dict) or str(value) in message
            if not shown and kind != "model_type":
                message += f" (got {value!r})"
        problems.append(_problem(loc, message, lines))
    return problems


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys a model accepts at a nested location, for 'did you mean' hints.

    Walks models by field, tables of named tables (``dict[str, Model]``, or a model's
    typed extra keys such as ``[links.NAME]``) by their value type, and
    ``X | None`` to ``X``; keys are given as written in the file (aliases).
    """
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is not None:
            current = fields[part].annotation if part in fields else _extra_type(current)
        else:
            args = getattr(current, "__args__", ())
            current = args[-1] if args else None
        current = _unwrap(current)
    fields = getattr(current, "model_fields", None)
    return [info.alias or name for name, info in fields.items()] if fields else []


def _extra_type(model: type[BaseModel]) -> Any:
    """The type of a model's typed extra keys (``__pydantic_extra__: dict[str, X]``), or None."""
    try:
        extra = typing.get_type_hints(model).get("__pydantic_extra__")
    except (NameError, TypeError):
        return None
    return get_args(extra)[-1] if get_args(extra) else None


def _unwrap(annotation: Any) -> Any:
    """``Model | None`` → ``Model``; anything else as it is."""
    if isinstance(annotation, types.UnionType) or get_origin(annotation) is Union:
        for arg in get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return annotation


def _did_you_mean(word: str | None, choices: Any) -> str:
    if not word:
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _problem(loc: tuple[str, ...], message: str, lines: dict[tuple[str, ...], int]) -> Problem:
    line = None
    for depth in range(len(loc), 0, -1):
        line = lines.get(tuple(loc[:depth]))
        if line:
            break
    return Problem(".".join(loc), message, line)


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'. ]+?)\s*=")


def _split_key(key: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in key.split("."))


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map key paths to the line they are written on (tomllib does not keep lines)."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            table = _split_key(header.group(1))
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            lines.setdefault((*table, *_split_key(key.group(1))), number)
    return lines


def _line_of_decode_error(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None
