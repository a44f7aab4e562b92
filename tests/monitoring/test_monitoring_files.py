"""The shipped monitoring files: alert rules (promtool unit tests), Prometheus config,
and the Grafana dashboard, whose every expression must name only exported metrics."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import pytest
from gateway.monitoring.metrics import (
    CALL_KINDS,
    PORT_STATS,
    ROUTE_COUNTERS,
    ROUTE_GAUGES,
    SERVICE_STATS,
    route_family,
)
from live_site import http_get, live_site, require_binary

from gateway.config import PortConfig
from gateway.ports import Port

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
ALERTS = MONITORING / "alerts"
DASHBOARD = MONITORING / "grafana" / "borderlink-site.json"

SITE = """
[site]
name = "Names test"
country = "US"

[web]
port = 0

[ports.radio]
kind = "simulated_radio"
talk_offset = "1h"

[ports.other]
kind = "tone"

[talkgroups.tg]
members = ["radio"]

[talkgroups.tg2]
members = ["other"]

[patches.joined]
talkgroups = ["tg", "tg2"]
"""

# PromQL words that are not metric names.
PROMQL_WORDS = {
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "rate",
    "increase",
    "irate",
    "histogram_quantile",
    "min_over_time",
    "max_over_time",
    "avg_over_time",
    "label_values",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "le",
}


class LegPort(Port):
    """A network-leg stand-in reporting every well-known stats() key, so their families show."""

    def stats(self) -> dict[str, float]:
        return {key: 1.0 for key in PORT_STATS}


def exported_names(tmp_path: Path) -> set[str]:
    """Metric sample names a live gateway serves, with a leg reporting all port stats."""

    async def scrape() -> str:
        async with live_site(tmp_path, SITE) as gw:
            gw.engine.attach(LegPort("leg", PortConfig(kind="leg"), gw.config.timing), "tg")
            return (await http_get(gw, "/metrics"))[1]

    text = asyncio.run(scrape())
    promtool = require_binary("promtool")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stderr
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}
    # Service families appear when their service runs (MQTT, SIP, console): by contract.
    names |= {PREFIX_NAME(name) for name, *_ in SERVICE_STATS.values()}
    # So do the per-route families of calls (SIP: with a [sip] section).
    for kind in CALL_KINDS:
        names |= {
            PREFIX_NAME(f"{kind}_{n}")
            for n in ("route_calls", "route_calls_talking", "route_calls_keyed")
        }
        names |= {PREFIX_NAME(route_family(kind, k)[0]) for k in (*ROUTE_COUNTERS, *ROUTE_GAUGES)}
    return names


def PREFIX_NAME(name: str) -> str:  # noqa: N802
    return "borderlink_" + name


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that are metric names (not functions, labels)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS and not w.startswith("$")}


def base_name(sample: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def alert_exprs() -> list[tuple[str, str]]:
    text = (ALERTS / "borderlink.rules.yml").read_text()
    exprs = []
    for alert, body in re.findall(r"- alert: (\w+)\n((?:\s{8,}.*\n)+)", text):
        folded = re.search(r"expr: >-\n((?:\s{10,}.*\n)+)", body)
        single = re.search(r"expr: (.+)\n", body)
        expr = " ".join(folded.group(1).split()) if folded else single.group(1)
        exprs.append((alert, expr))
    return exprs


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = require_binary("promtool")
    for args in (
        ["check", "rules", "borderlink.rules.yml"],
        ["test", "rules", "borderlink.rules_test.yml"],
    ):
        done = subprocess.run(
            [promtool, *args], cwd=ALERTS, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
    listed = {name for name, _ in alert_exprs()}
    assert {
        "BorderlinkTransmitterStuck",
        "BorderlinkPortDown",
        "BorderlinkSipRegistrationLost",
        "BorderlinkLateTicks",
        "BorderlinkPacketLoss",
        "BorderlinkKeyedWithoutAudio",
        "BorderlinkLinkDown",
    } <= listed
    tested = (ALERTS / "borderlink.rules_test.yml").read_text()
    for name in listed:
        assert f"alertname: {name}" in tested, f"alert {name} has no promtool unit test"


def test_example_prometheus_config_is_valid() -> None:
    promtool = require_binary("promtool")
    done = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_and_alerts_name_only_exported_metrics(tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    exported = {base_name(n) for n in exported_names(tmp_path)}
    exprs = dashboard_exprs()
    assert len(exprs) > 30
    for where, expr in exprs:
        unknown = {base_name(n) for n in metric_names(expr)} - exported
        assert not unknown, (
            f"dashboard panel {where!r} uses metrics the gateway does not export: {unknown}"
        )
    documented = (MONITORING / "README.md").read_text()
    missing = sorted(n for n in exported if f"`{n}`" not in documented)
    assert not missing, f"monitoring/README.md does not list: {missing}"
    for where, expr in alert_exprs():
        unknown = {base_name(n) for n in metric_names(expr)} - exported - {"up"}
        assert not unknown, f"alert {where} uses metrics the gateway does not export: {unknown}"


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query (Grafana variables filled in) as a recording rule."""
    promtool = require_binary("promtool")
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(dashboard_exprs()):
        filled = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        lines += [f"      - record: dashboard:panel_{i}", f"        expr: {json.dumps(filled)}"]
    rules = tmp_path / "dashboard.rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(borderlink_x_bucket{a="b"}[5m]))', {"borderlink_x_bucket"}),
        ("a * on(patch) group_left b > 0", {"a", "b"}),
        ('histogram_quantile(0.9, foo{le="1"})', {"foo"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    """The checker itself finds every metric name, so a typo in a query cannot slip by."""
    assert metric_names(expr) == names
