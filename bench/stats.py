"""Repeated measurements summarised as median with min-max, and ratios against baselines."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figure:
    scenario: str
    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median=self.median, min=min(self.values, default=None), max=max(self.values, default=None))
        return data


@dataclass
class Target:
    name: str
    measured: float
    goal: str
    met: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")
