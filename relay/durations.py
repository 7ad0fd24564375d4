"""Parsing the operator's durations ("7d", "12h", "1d12h", "90s")."""

from __future__ import annotations

import re
from datetime import timedelta

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")


def parse_duration(text: str) -> timedelta:
    """A positive duration from text such as "7d", "36h", "1d12h", "30m", "45s", "2w".

    Raises ValueError with a readable message for anything else (no unit, unknown unit,
    negative or zero).
    """
    compact = text.strip().lower()
    if not _WHOLE.fullmatch(compact):
        raise ValueError(f"invalid duration {text!r}: use a number and a unit s/m/h/d/w, e.g. 7d or 12h")
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(compact))
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be greater than zero")
    return timedelta(seconds=seconds)
