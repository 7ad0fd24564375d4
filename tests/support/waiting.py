"""Waiting for a condition, never for a fixed time: with a timeout, and a message saying what did not happen."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


def wait_until(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `condition` until it returns something truthy and return that; AssertionError
    naming `what` if it has not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@overload
async def until(
    condition: Callable[[], Awaitable[T | None]], within: float, what: str, *, interval: float = ...
) -> T: ...
@overload
async def until(condition: Callable[[], T | None], within: float, what: str, *, interval: float = ...) -> T: ...
async def until(
    condition: Callable[[], Any],
    within: float,
    what: str,
    *,
    interval: float = 0.05,
) -> Any:
    """wait_until for async tests: `condition` may be a coroutine function; the loop is never blocked."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)
