"""How long to wait before trying again: one policy for the relay and the worker. Pure."""

from __future__ import annotations

import random
from collections.abc import Callable

# 2**62 seconds is far beyond any cap; stopping there keeps the float arithmetic finite.
_MAX_EXPONENT = 62


def backoff_delay(failures: int, *, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after `failures` consecutive failures (failures >= 1: the first failure waits `base`).

    Exponential (base, 2*base, 4*base, ...) capped at `cap`, with "equal jitter": the result
    lies in [step/2, step], so processes that failed together (a database restart) do not
    retry together, yet none retries sooner than half its step. Raises ValueError if failures < 1.
    """
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    step = min(cap, base * 2.0 ** min(failures - 1, _MAX_EXPONENT))
    return step / 2 + rand() * step / 2
