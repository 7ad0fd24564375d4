"""The hand-over from the asyncio pool (worker.pool) to the thread that runs Celery's trace of a task
whose coroutine already ran on the loop: the coroutine's outcome, its request and its observed run.

Each trace thread runs one trace at a time, so a thread-local holds the run being traced; the task's
function and the prerun/postrun handlers find it by the task id of the request they are given.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.app.task import Context

_local = threading.local()


class Prepared:
    """One delivery of a task whose coroutine runs (or ran) on the loop."""

    __slots__ = ("observed", "outcome", "request", "task_id")

    def __init__(self, task_id: str, request: Context) -> None:
        self.task_id = task_id
        self.request = request  # the coroutine's view of the delivery (id, retries, headers)
        self.outcome: asyncio.Future[Any] | None = None  # the coroutine's task, once it ended
        self.observed: Any = None  # worker.observability's run: span and start, begun with the coroutine


@contextmanager
def handed_over(run: Prepared | None) -> Iterator[None]:
    """Make `run` the current thread's prepared run while it traces that task."""
    _local.run = run
    try:
        yield
    finally:
        _local.run = None


def current(task_id: str | None) -> Prepared | None:
    """The prepared run this thread is tracing, if it is the delivery of `task_id`."""
    run: Prepared | None = getattr(_local, "run", None)
    return run if run is not None and run.task_id == task_id else None
