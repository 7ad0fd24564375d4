"""The worker's default execution pool: each task's waits run on the process's asyncio loop.

Celery's threads pool holds a thread for every task in flight: with the seed's delays (2 s for an
email, 1 s for an audit record) 450 tasks are in flight at 150 transfers/s, and each of their
database calls crosses from its thread to the loop and back. This pool runs a task in two steps:

1. The task's coroutine (`OutboxTask.coroutine`) runs on the loop of the process's WorkerDatabase:
   its statements, its simulated delays and its pauses are awaited there, so thousands can be in
   flight with no thread each (CELERY_WORKER_CONCURRENCY bounds them, as the prefetch does).
2. When it ends, Celery's own trace runs in one of a few threads (TRACE_THREADS) with the
   coroutine's outcome handed over (`prepared`): the task's function returns the result or raises
   what the coroutine raised, and Celery stores the result, retries, sends events, signals and
   acknowledges exactly as for any other pool.

Tasks without a coroutine (none of ours) run whole in those threads, as under the threads pool.
Like the threads pool, it cannot stop a task: the tasks bound their own I/O. A warm shutdown waits
for the tasks in flight.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from typing import Any

from celery.app.task import Context
from celery.concurrency.base import BasePool, apply_target
from kombu.serialization import loads, prepare_accept_content

from worker import prepared

# Threads that run Celery's trace of a finished coroutine: its result-backend write, the
# acknowledgement and the signals, a fraction of a millisecond each. Two overlap one trace's wait
# for the result backend with another's work. Every thread more contends for the GIL with the
# loop and the consumer: draining a backlog with the seed's delays, four cost about 20% more CPU
# per task than one or two, and completed about 20% fewer tasks per second.
TRACE_THREADS = 2


class AsyncioPool(BasePool):  # type: ignore[misc]
    """Runs `limit` tasks at once: their coroutines on the database loop, their traces in threads."""

    body_can_be_buffer = True
    signal_safe = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._traces = ThreadPoolExecutor(max_workers=min(self.limit or 1, TRACE_THREADS), thread_name_prefix="trace")
        self._accept = prepare_accept_content(self.app.conf.accept_content)  # type: ignore[no-untyped-call]
        self._in_flight = 0
        self._idle = threading.Condition()

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **_: Any,
    ) -> None:
        args = tuple(args or ())
        name, task_id, request, body, content_type, content_encoding = args[:6]
        task = self.app.tasks.get(name)
        decoded = self._decoded(body, content_type, content_encoding) if hasattr(task, "coroutine") else None
        with self._idle:
            self._in_flight += 1
        if accept_callback:
            accept_callback(os.getpid(), time.monotonic())
        if decoded is None:  # not one of ours, or a body only the trace can fail properly
            self._trace(None, partial(apply_target, target, args, kwargs, callback))
            return
        task_args, task_kwargs, embed = decoded
        run = prepared.Prepared(task_id, Context(request, args=task_args, kwargs=task_kwargs, **(embed or {})))
        observer = getattr(self.app, "observer", None)
        if observer is not None:  # the run's span and clock start now, and the coroutine runs inside the span
            run.observed = observer.begin(task, run.request)
        # The trace takes the decoded body (content type None) as it is.
        traced = (name, task_id, request, decoded, None, None, *args[6:])
        apply = partial(apply_target, target, traced, kwargs, callback)

        def finished(outcome: asyncio.Task[Any]) -> None:
            run.outcome = outcome
            self._trace(run, apply)

        try:
            with observer.current(run.observed) if observer is not None else nullcontext():
                task.context.database.start(task.coroutine(run.request, task_args, task_kwargs), finished)
        except BaseException:
            self._done()
            raise

    def _decoded(self, body: Any, content_type: str | None, content_encoding: str | None) -> tuple[Any, ...] | None:
        """The message body as (args, kwargs, embed), decoded once; None if it does not decode, and
        then Celery's trace fails the task with the error, as under any other pool."""
        try:
            decoded = loads(body, content_type, content_encoding, accept=self._accept) if content_type else body  # type: ignore[no-untyped-call]
            task_args, task_kwargs, embed = decoded
        except Exception:
            return None
        return task_args, task_kwargs, embed

    def _trace(self, run: prepared.Prepared | None, apply: Callable[[], None]) -> None:
        """Run Celery's trace (`apply`) in a trace thread, with `run` handed over to it."""
        try:
            self._traces.submit(self._apply, run, apply)
        except RuntimeError:  # shut down: the message stays unacknowledged and is redelivered
            self._done()

    def _apply(self, run: prepared.Prepared | None, apply: Callable[[], None]) -> None:
        try:
            with prepared.handed_over(run):
                apply()
        finally:
            self._done()

    def _done(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def on_stop(self) -> None:
        # Warm shutdown: the tasks in flight finish and are acknowledged, as under the threads pool.
        with self._idle:
            self._idle.wait_for(lambda: not self._in_flight)
        self._traces.shutdown(wait=True)
        super().on_stop()

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info.update({"max-concurrency": self.limit, "in-flight": self._in_flight, "trace-threads": TRACE_THREADS})
        return info
