"""Talkgroups and patches → mix groups.

A talkgroup is a named set of ports. A patch joins talkgroups into one mix group
(a virtual talkgroup) without changing their membership, so unpatching restores
them exactly. Patches that share a talkgroup chain together (A+B and B+C make
one group A+B+C), as they would on a dispatcher's patch panel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.config import FloorMode, PatchConfig, TalkgroupConfig


@dataclass(frozen=True)
class MixGroup:
    """Ports that hear each other this tick, with one floor."""

    name: str
    talkgroups: tuple[str, ...]
    floor: FloorMode
    patches: tuple[str, ...] = ()

    @property
    def patched(self) -> bool:
        return len(self.talkgroups) > 1


def plan_mix_groups(
    talkgroups: Mapping[str, TalkgroupConfig],
    patches: Mapping[str, PatchConfig],
    active: Iterable[str] | None = None,
) -> list[MixGroup]:
    """The mix groups for the patches in ``active`` (default: those enabled in config).

    A patched group's floor is the patch's own setting, else ``single`` if any of
    its talkgroups is single (one talker at a time wins over a free-for-all).
    """
    active_set = {n for n, p in patches.items() if p.enabled} if active is None else set(active)
    parent = {name: name for name in talkgroups}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for patch_name in sorted(active_set):
        patch = patches[patch_name]
        first = root(patch.talkgroups[0])
        for other in patch.talkgroups[1:]:
            parent[root(other)] = first

    members: dict[str, list[str]] = {}
    for name in talkgroups:
        members.setdefault(root(name), []).append(name)

    groups = []
    for tg_names in members.values():
        joined = set(tg_names)
        via = tuple(
            sorted(
                p for p in active_set if set(patches[p].talkgroups) <= joined and len(joined) > 1
            )
        )
        floor = _floor_for(tg_names, via, talkgroups, patches)
        name = "+".join(tg_names)
        groups.append(MixGroup(name, tuple(tg_names), floor, via))
    return groups


def _floor_for(
    tg_names: list[str],
    via: tuple[str, ...],
    talkgroups: Mapping[str, TalkgroupConfig],
    patches: Mapping[str, PatchConfig],
) -> FloorMode:
    chosen = [patches[p].floor for p in via if patches[p].floor]
    if chosen:
        return "single" if "single" in chosen else "mix"
    return "single" if any(talkgroups[t].floor == "single" for t in tg_names) else "mix"
