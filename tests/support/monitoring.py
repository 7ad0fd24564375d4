"""The monitoring files as data: the metric catalog, the alert rules, the dashboard, and promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest
import yaml

from tests.support.environment import ROOT

MONITORING = ROOT / "monitoring"
CATALOG = MONITORING / "metrics.yml"
ALERTS = MONITORING / "prometheus" / "alerts.yml"
ALERT_TESTS = MONITORING / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "outbox.json"

# Series Prometheus makes itself, which the rules and the dashboard may use beside the catalog's.
BUILT_IN = {"up", "ALERTS"}
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}


@dataclass(frozen=True)
class Metric:
    name: str
    job: str
    type: str
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] | None


@cache
def catalog() -> dict[str, Metric]:
    """Every metric of monitoring/metrics.yml, by name."""
    raw: dict[str, Any] = yaml.safe_load(CATALOG.read_text())
    metrics = {}
    for job, section in raw.items():
        for name, spec in section["metrics"].items():
            buckets = tuple(float(b) for b in spec["buckets"]) if "buckets" in spec else None
            metrics[name] = Metric(name, job, spec["type"], tuple(spec["labels"]), spec["help"], buckets)
    return metrics


def series_names() -> set[str]:
    """The series names a query may select: the catalog's, a histogram's _bucket/_sum/_count, the built-ins."""
    names = set(BUILT_IN)
    for metric in catalog().values():
        names.add(metric.name)
        if metric.type == "histogram":
            names.update(metric.name + suffix for suffix in _HISTOGRAM_SERIES)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels, keywords or durations)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors (and Grafana's $__rate_interval)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    tokens = re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", expr)
    return {token for token in tokens if token not in _PROMQL_WORDS}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def promtool() -> str:
    """promtool's path. Missing, it fails the test (CI installs Debian's `prometheus` package, see .ci/run);
    ALLOW_NO_PROMTOOL=1 turns that into a skip on a machine that cannot install it. PROMTOOL names a binary
    that is not on PATH."""
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if found:
        return found
    message = "promtool not found: `apt-get install prometheus` (Debian) or set PROMTOOL=/path/to/promtool"
    if os.environ.get("ALLOW_NO_PROMTOOL") == "1":
        pytest.skip(message + " (skipped: ALLOW_NO_PROMTOOL=1)")
    pytest.fail(message + "; ALLOW_NO_PROMTOOL=1 skips the promtool checks instead")
