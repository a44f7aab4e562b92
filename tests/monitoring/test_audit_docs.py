"""docs/audit.md lists every audit event the code writes, with every field it writes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMON = {"seq", "ts", "site", "event"}
# Engine events become audit records of the same name, but for these two.
ENGINE_TO_AUDIT = {"talk_stop": "talk", "ptt_off": "transmit"}
# Calls that write an audit record: gateway.audit.record, Gateway.note, Port.report,
# the console's self.audit(...).
WRITERS = {"record", "note", "report", "audit"}


def documented() -> dict[str, set[str]]:
    """event → fields, from the table in docs/audit.md."""
    table: dict[str, set[str]] = {}
    for line in (REPO / "docs" / "audit.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`[a-z_]+`", cells[0]):
            table[cells[0].strip("`")] = set(re.findall(r"`([a-z_]+)`", cells[1]))
    return table


def written_in_code() -> dict[str, set[str]]:
    """event → keyword fields, for every audit write with a literal event name."""
    found: dict[str, set[str]] = {}
    for path in [*(REPO / "gateway").rglob("*.py"), *(REPO / "hardware").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            name = (
                node.func.attr
                if isinstance(node.func, ast.Attribute)
                else getattr(node.func, "id", "")
            )
            if name == "Event":
                found.setdefault(ENGINE_TO_AUDIT.get(first.value, first.value), set())
            elif name in WRITERS and re.fullmatch(r"[a-z_]+", first.value):
                fields = {k.arg for k in node.keywords if k.arg and k.arg != "warn"}
                found.setdefault(first.value, set()).update(fields)
    return found


def check_records(records: list[dict]) -> None:
    """Every record of a real run is a documented event with documented fields."""
    table = documented()
    for record in records:
        assert record["event"] in table, f"docs/audit.md does not list {record['event']!r}"
        extra = set(record) - COMMON - table[record["event"]]
        assert not extra, f"docs/audit.md: {record['event']} does not list {sorted(extra)}"


def test_every_event_and_field_the_code_writes_is_documented() -> None:
    table, code = documented(), written_in_code()
    assert len(table) > 20, "the table in docs/audit.md was not found"
    missing = sorted(set(code) - set(table))
    assert not missing, f"docs/audit.md does not list: {missing}"
    for event, fields in code.items():
        extra = fields - table[event]
        assert not extra, f"docs/audit.md: {event} does not list {sorted(extra)}"


def test_the_check_can_fail() -> None:
    check_records([{"seq": 1, "ts": "", "site": "s", "event": "talk", "port": "a"}])
    for bad in ({"event": "unheard_of"}, {"event": "talk", "caller_number": "+1555"}):
        try:
            check_records([bad])
        except AssertionError:
            continue
        raise AssertionError(f"{bad} passed the check")
