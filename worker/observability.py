"""The worker's metrics (monitoring/metrics.yml, job `worker`) and its part of a transfer's trace.

Hooked on Celery's signals by `install(app, settings)` (called by create_celery_app), so the tasks
themselves only report one thing: a duplicate delivery they absorbed (`absorbed(request, result)`).

- Metrics, on WORKER_METRICS_PORT (0: none), served by the worker's main process from `worker_init`.
  They count the tasks that process runs: the asyncio pool (the default) and the threads pool run them
  all there. Under
  prefork the tasks run in child processes whose counts this server does not see; and several worker
  processes on one host each need a port of their own (or 0).
- Logs: one INFO line per task run, `<task name>[<task id>] <outcome> in <seconds>s`, in place of
  Celery's own lines, which carry the arguments and the result (worker.celery_app).
- Traces: each task run is a CONSUMER span `process <task name>`, child of the message's `traceparent`
  header (the relay's publish span, or the request's), current while the task runs (in its coroutine on
  the loop, and in Celery's trace of it), so the task's log lines carry the transfer's trace id. Under
  the asyncio pool a run's span and clock start when its coroutine is handed to the loop (RunObserver).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from celery import Celery, Task, signals
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram

from core.metrics import MetricsServer, new_registry, start_metrics_server
from core.settings import Settings
from core.telemetry import WORKER_SERVICE, configure_tracing, context_from_traceparent, flush_tracing
from worker import prepared

TASK_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COMPLETION_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip
SUCCEEDED, RETRIED, FAILED = "succeeded", "retried", "failed"
# Headers the relay sets (relay.tracing).
TRACEPARENT_HEADER = "traceparent"
CREATED_AT_HEADER = "outbox_created_at"
# A request attribute set by absorbed(): the run returned an effect that already existed.
_ABSORBED = "outbox_absorbed"
# A request attribute holding the run's span and start. On the request, not in a map keyed by task
# id: two deliveries of one task id may run at once, each in its own thread with its own request.
_RUN = "outbox_run"
_T = TypeVar("_T")
_OUTCOMES = {"SUCCESS": SUCCEEDED, "RETRY": RETRIED, "FAILURE": FAILED}

logger = logging.getLogger(__name__)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or new_registry()
        self.tasks = Counter(
            "outbox_tasks", "Task runs by task name and outcome.", ["task", "outcome"], registry=registry
        )
        self.duration = Histogram(
            "outbox_task_duration_seconds",
            "One run of a task.",
            ["task"],
            buckets=TASK_DURATION_BUCKETS,
            registry=registry,
        )
        self.completion = Histogram(
            "outbox_completion_latency_seconds",
            "Commit of the outbox row to its task's completion.",
            ["task"],
            buckets=COMPLETION_LATENCY_BUCKETS,
            registry=registry,
        )
        self.duplicates = Counter(
            "outbox_duplicates_absorbed", "Deliveries whose effect already existed.", ["task"], registry=registry
        )


def absorbed(request: Any, result: _T) -> _T:
    """For a task that found its effect already made (a redelivery or a re-publish): counts the run
    whose `request` this is as an absorbed duplicate (and not as a completion) and returns `result`,
    the stored result it returns."""
    setattr(request, _ABSORBED, True)
    return result


def was_absorbed(request: Any) -> bool:
    return bool(getattr(request, _ABSORBED, False))


def _header(request: Any, name: str) -> Any:
    return (request.headers or {}).get(name) or getattr(request, name, None)


class _Run:
    __slots__ = ("span", "started", "token")

    def __init__(self, span: Span, started: float) -> None:
        self.span, self.started = span, started
        self.token: object = None


class RunObserver:
    """Begins a task run's span and clock. Under the asyncio pool (worker.pool) a run begins when its
    coroutine is handed to the loop, before Celery's trace; otherwise in task_prerun."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self._app, self._queue = app, settings.celery_task_queue
        self._tracer = trace.get_tracer("worker")

    def begin(self, task: Task, request: Any) -> _Run:
        parent = context_from_traceparent(_header(request, TRACEPARENT_HEADER))
        provider = getattr(self._app, "tracer_provider", None)  # tests give the app a provider of their own
        task_tracer = provider.get_tracer("worker") if provider else self._tracer
        span = task_tracer.start_span(f"process {task.name}", context=parent, kind=SpanKind.CONSUMER)
        if span.is_recording():
            span.set_attributes(
                {
                    "messaging.system": "celery",
                    "messaging.operation.type": "process",
                    "messaging.operation.name": "process",
                    "messaging.destination.name": self._queue,
                    "messaging.message.id": request.id,
                    "celery.task_name": task.name,
                    "celery.retries": request.retries or 0,
                }
            )
        return _Run(span, time.perf_counter())

    @contextmanager
    def current(self, run: _Run | None) -> Iterator[None]:
        """Make `run`'s span the current one in this thread (and in coroutines handed to the loop)."""
        if run is None:
            yield
            return
        token = otel_context.attach(trace.set_span_in_context(run.span))
        try:
            yield
        finally:
            otel_context.detach(token)


def install(app: Celery, settings: Settings, metrics: WorkerMetrics | None = None) -> WorkerMetrics | None:
    """Connect the metrics and tracing handlers for `app`'s tasks and give it its RunObserver
    (`app.observer`); returns the metrics (None when WORKER_METRICS_PORT is 0 and none are given).
    Handlers ignore tasks of other apps."""
    if metrics is None and settings.worker_metrics_port:
        metrics = WorkerMetrics()
    observer = app.observer = RunObserver(app, settings)
    server: list[MetricsServer] = []

    def ours(sender: Any) -> bool:
        return getattr(sender, "app", None) is app

    def on_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        configure_tracing(WORKER_SERVICE)
        if metrics is not None and not server:
            started = start_metrics_server(
                metrics.registry, settings.worker_metrics_port, variable="WORKER_METRICS_PORT"
            )
            if started is not None:
                server.append(started)

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        for running in server:
            running.close()
        server.clear()
        flush_tracing(trace.get_tracer_provider())

    def prerun(sender: Any = None, task_id: str = "", task: Any = None, **_: Any) -> None:
        if not ours(task):
            return
        handed = prepared.current(task_id)  # under the asyncio pool, the run began with its coroutine
        run = handed.observed if handed is not None and handed.observed else observer.begin(task, task.request)
        run.token = otel_context.attach(trace.set_span_in_context(run.span))
        setattr(task.request, _RUN, run)

    def postrun(sender: Any = None, task_id: str = "", task: Any = None, state: str | None = None, **_: Any) -> None:
        if not ours(task):
            return
        run: _Run | None = getattr(task.request, _RUN, None)
        if run is None:
            return
        elapsed = time.perf_counter() - run.started
        if metrics is not None:
            metrics.duration.labels(task.name).observe(elapsed)
        outcome = _OUTCOMES.get(state or "", str(state).lower())
        duplicate = was_absorbed(task.request)
        logger.info(
            "%s[%s] %s in %.3fs%s",
            task.name,
            task_id,
            outcome,
            elapsed,
            " (a duplicate: its effect already existed)" if duplicate else "",
            extra={"task_id": task_id, "task_name": task.name, "outcome": outcome},
        )
        if state == "FAILURE":
            run.span.set_status(Status(StatusCode.ERROR))
        run.span.end()
        otel_context.detach(run.token)  # type: ignore[arg-type]

    def success(sender: Any = None, **_: Any) -> None:
        if not ours(sender) or metrics is None:
            return
        name = sender.name
        metrics.tasks.labels(name, SUCCEEDED).inc()
        if was_absorbed(sender.request):
            metrics.duplicates.labels(name).inc()
            return  # its completion was counted when its effect was made
        created_at = _header(sender.request, CREATED_AT_HEADER)
        if isinstance(created_at, int | float):
            metrics.completion.labels(name).observe(max(time.time() - created_at, 0.0))

    def retry(sender: Any = None, **_: Any) -> None:
        if ours(sender) and metrics is not None:
            metrics.tasks.labels(sender.name, RETRIED).inc()

    def failure(sender: Any = None, **_: Any) -> None:
        if ours(sender) and metrics is not None:
            metrics.tasks.labels(sender.name, FAILED).inc()

    for signal, handler in (
        (signals.worker_init, on_init),
        (signals.worker_shutdown, on_shutdown),
        (signals.task_prerun, prerun),
        (signals.task_postrun, postrun),
        (signals.task_success, success),
        (signals.task_retry, retry),
        (signals.task_failure, failure),
    ):
        signal.connect(handler, weak=False)  # closures: nothing else keeps them alive
    return metrics
