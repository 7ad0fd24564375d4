"""A fast stand-in for Celery's ``saferepr`` on plain JSON values.

Celery puts ``kwargsrepr = saferepr(kwargs, 1024, maxlevels=...)`` in every task message's
headers. saferepr is a pure-Python token stream and costs about 70% of building a message.
For JSON values (dict, list, str, int, float, bool, None) whose repr is shorter than the
limit, not nested deeper than maxlevels, and whose strings need no quoting or escaping,
saferepr returns exactly ``repr()``. This module checks that case cheaply and otherwise
defers to saferepr itself.
"""

from __future__ import annotations

from typing import Any

from celery.utils.saferepr import saferepr

_SCALARS = frozenset({str, int, float, bool, type(None)})


def kwargs_repr(kwargs: Any, maxlen: int, maxlevels: int) -> str:
    """Exactly ``saferepr(kwargs, maxlen, maxlevels=maxlevels)``, computed fast when it is safe."""
    if _json_within(kwargs, 1, maxlevels):
        text = repr(kwargs)
        # saferepr single-quotes every string and escapes nothing; repr agrees exactly when no
        # string holds a quote, a backslash or an unprintable character, and each of those
        # makes repr write a backslash or switch to double quotes.
        if len(text) < maxlen and "\\" not in text and '"' not in text:
            return text
    return str(saferepr(kwargs, maxlen, maxlevels=maxlevels))


def _json_within(value: Any, depth: int, maxlevels: int) -> bool:
    """True if value is built of JSON types only, with containers at most maxlevels deep."""
    kind = type(value)
    if kind is dict:
        items = value.values()
        if not all(type(key) is str for key in value):
            return False
    elif kind is list:
        items = value
    else:
        return kind in _SCALARS
    if maxlevels and depth > maxlevels:
        return False  # saferepr prints a container this deep as {...} or [...]
    for item in items:
        if type(item) in _SCALARS:
            continue
        if not _json_within(item, depth + 1, maxlevels):
            return False
    return True
