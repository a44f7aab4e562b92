"""Evaluate the shipped alert rules on what a running gateway really exported.

A test causes a condition on a live gateway and scrapes /metrics before and after.
``firing`` then asks promtool which alerts of a rule fire if the gateway stayed as
the scrapes show it: every gauge holds its last scraped value, every counter goes on
at the rate seen between the two scrapes. promtool evaluates the real rules file
(expression, ``for`` and ranges), so a rule that reads a series the gateway does not
export, or reads it wrongly, stays silent and the test fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from live_site import http_get, require_binary
from prometheus_client.parser import text_string_to_metric_families
from test_monitoring_files import ALERTS, alert_exprs, metric_names

RULES = ALERTS / "borderlink.rules.yml"
STEP_S = 15  # the evaluation interval promtool is given
LONGEST_RANGE_S = 15 * 60  # the widest range any rule reads (increase(...[15m]))

Labels = frozenset[tuple[str, str]]


@dataclass
class Scrape:
    """One scrape: sample values by (name, labels), and which sample names are counters."""

    at: float
    values: dict[tuple[str, Labels], float]
    counters: set[str] = field(default_factory=set)

    def get(self, name: str, **labels: str) -> float | None:
        """The value of the one sample with this name whose labels include ``labels``."""
        want = set(labels.items())
        found = [v for (n, lab), v in self.values.items() if n == name and want <= lab]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
        return found[0] if found else None


def parse(text: str, at: float | None = None) -> Scrape:
    scrape = Scrape(time.monotonic() if at is None else at, {})
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            scrape.values[(sample.name, frozenset(sample.labels.items()))] = sample.value
            if family.type == "counter":
                scrape.counters.add(sample.name)
    return scrape


async def scrape(gw) -> Scrape:  # noqa: ANN001
    status, text = await http_get(gw, "/metrics")
    assert status == 200, text
    return parse(text)


def rule_for(alert: str) -> tuple[str, float]:
    """The rule's expression and its ``for`` (seconds, 0 when it has none)."""
    expr = dict(alert_exprs())[alert]
    text = RULES.read_text()
    body = re.search(rf"- alert: {alert}\n((?:\s{{8,}}.*\n)+)", text)
    assert body, alert
    hold = re.search(r"^\s+for: (\d+)([smh])$", body.group(1), re.M)
    seconds = int(hold.group(1)) * {"s": 1, "m": 60, "h": 3600}[hold.group(2)] if hold else 0
    return expr, float(seconds)


def _series(name: str, labels: Labels) -> str:
    inside = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels))
    return f"{name}{{{inside}}}"


def firing(alert: str, before: Scrape, after: Scrape, folder: Path) -> list[dict[str, str]]:
    """The labels of every alert ``alert`` raises if the gateway stays as scraped."""
    promtool = require_binary("promtool")
    expr, hold = rule_for(alert)
    names = metric_names(expr)
    eval_s = int(hold + LONGEST_RANGE_S + 2 * STEP_S)
    points = eval_s // STEP_S + 1
    elapsed = max(after.at - before.at, 1e-3)
    lines = []
    for (name, labels), value in sorted(after.values.items(), key=str):
        if name not in names:
            continue
        if name in after.counters:
            start = before.values.get((name, labels), 0.0)
            step = max(value - start, 0.0) / elapsed * STEP_S
            values = f"{start}+{step}x{points}"
        else:
            values = f"{value}x{points}"
        lines.append(f"      - series: '{_series(name, labels)}'\n        values: '{values}'\n")
    assert lines, f"the scrapes hold none of the series {alert} reads: {sorted(names)}"
    test = folder / f"{alert}_test.yml"
    test.write_text(
        f"rule_files:\n  - {RULES}\nevaluation_interval: {STEP_S}s\ntests:\n"
        f"  - interval: {STEP_S}s\n    input_series:\n{''.join(lines)}"
        f"    alert_rule_test:\n      - eval_time: {eval_s}s\n        alertname: {alert}\n"
        "        exp_alerts: []\n"
    )
    run = subprocess.run(
        [promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=60
    )
    if run.returncode == 0:
        return []
    out = run.stdout + run.stderr
    got = out.partition("got:")[2]
    assert got, f"promtool could not evaluate {alert}:\n{out}"
    return [
        dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
        for labels in re.findall(r"Labels:\{([^}]*)\}", got)
    ]
