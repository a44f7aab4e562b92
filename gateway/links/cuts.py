"""Sovereign cuts, remembered: which links (or shared names) this side has cut, by whom, why.

A cut stays until this side restores it — across a reload and a restart — so it is
kept in a small JSON file next to the site config (``SITE.links-cuts.json``),
written atomically (temporary file, then rename) on every change. Without a
config file (a site built in memory) cuts live in memory only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

WHOLE = "*"  # the shared-name key of a cut of the whole link
MAX_REASON = 200


@dataclass(frozen=True)
class Cut:
    who: str
    when: str  # UTC, ISO 8601
    reason: str = ""


def state_path(config_source: Path | None) -> Path | None:
    if config_source is None:
        return None
    return config_source.with_name(config_source.stem + ".links-cuts.json")


class CutStore:
    """link → shared name (or :data:`WHOLE`) → :class:`Cut`."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.cuts: dict[str, dict[str, Cut]] = {}
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                self.cuts = {
                    link: {name: Cut(**cut) for name, cut in names.items()}
                    for link, names in data.items()
                }
            except (OSError, ValueError, TypeError) as exc:
                # Never start a cut link by accident: an unreadable file cuts nothing
                # silently — it is an error the operator must see and fix.
                raise ValueError(
                    f"cannot read the links' cut state {str(path)!r}: {exc}; fix or delete it "
                    "(deleting it restores every cut link)"
                ) from exc

    def of(self, link: str) -> tuple[bool, frozenset[str]]:
        names = self.cuts.get(link, {})
        return WHOLE in names, frozenset(n for n in names if n != WHOLE)

    def cut(self, link: str, name: str | None, who: str, reason: str) -> Cut:
        cut = Cut(who[:64], datetime.now(UTC).isoformat(timespec="seconds"), reason[:MAX_REASON])
        self.cuts.setdefault(link, {})[name or WHOLE] = cut
        self._save()
        return cut

    def restore(self, link: str, name: str | None) -> bool:
        """Lift a cut; False when there was none. Restoring the link lifts every cut on it."""
        names = self.cuts.get(link, {})
        if name is None:
            had = bool(names)
            self.cuts.pop(link, None)
        else:
            had = names.pop(name, None) is not None
            if not names:
                self.cuts.pop(link, None)
        if had:
            self._save()
        return had

    def _save(self) -> None:
        if self.path is None:
            return
        data = {link: {n: asdict(c) for n, c in names.items()} for link, names in self.cuts.items()}
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".links-cuts.")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(data, file, indent=1)
            os.replace(temporary, self.path)
        except OSError:
            log.exception("could not save the links' cut state to %s", self.path)
            Path(temporary).unlink(missing_ok=True)
