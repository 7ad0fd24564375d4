"""The README stays true to the code: every setting, metric and alert documented, the two commands up front."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from tests.support.monitoring import alert_rules, catalog

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_documented(field: str) -> None:
    info = Settings.model_fields[field]
    variable = (info.alias or field).upper()
    assert f"`{variable}`" in README


def test_the_first_screen_says_how_to_run_and_test() -> None:
    first_screen = "\n".join(README.splitlines()[:15])
    assert "make run" in first_screen
    assert "make test" in first_screen


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


@pytest.mark.parametrize("metric", sorted(catalog()))
def test_every_metric_is_documented_in_monitoring(metric: str) -> None:
    assert f"| `{metric}` |" in _section("Monitoring")


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_is_documented_with_its_threshold(rule: dict[str, Any]) -> None:
    [row] = [line for line in _section("Monitoring").splitlines() if line.startswith(f"| `{rule['alert']}` |")]
    assert f"| {rule['for']} | {rule['labels']['severity']} |" in row
    threshold = re.search(r">\s*([\d.]+)\s*$", rule["expr"].strip())
    if threshold:
        assert f"> {threshold.group(1)}" in row
