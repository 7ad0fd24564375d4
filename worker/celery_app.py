"""The Celery application: `celery -A worker.celery_app worker --loglevel=info`.

Every knob comes from core.settings (environment variables); `create_celery_app(settings)`
builds an app from explicit settings, which is how the tests build theirs. Importing this
module builds nothing: `worker.celery_app.app`, which the celery command asks for, is built
from the environment on first access.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from core.logging import configure_logging
from core.settings import Settings, get_settings
from worker import observability
from worker.context import WorkerContext
from worker.tasks import register_tasks

# Celery's loggers that write a line per task received, succeeded and retried. Those lines carry the
# task's arguments and its result, which hold the recipient's e-mail address (personal data), and
# cost formatting per task; the worker logs its own line per run instead (worker.observability).
# Their WARNING and ERROR lines (a task failed or could not run) still reach the log.
CELERY_PER_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")
# How many times the worker retries storing a result while the result backend is down
# (Celery sleeps 10 ms doubling to 10 s between tries: about two minutes in all).
RESULT_BACKEND_MAX_RETRIES = 20
# CELERY_WORKER_POOL's values: Celery's own pools by their names, ours by its class.
WORKER_POOLS = {"asyncio": "worker.pool:AsyncioPool", "threads": "threads", "prefork": "prefork", "solo": "solo"}


class WorkerApp(Celery):  # type: ignore[misc]
    """A Celery app that carries its tasks' context (settings, the process's database)."""

    def __init__(self, context: WorkerContext, **options: Any) -> None:
        super().__init__("outbox_worker", **options)
        self.context = context
        self.observer: observability.RunObserver | None = None  # set by observability.install


def check_time_limits(settings: Settings) -> None:
    """Refuse limits that break redelivery. Raises ValueError naming the variables."""
    hard, soft = settings.celery_task_time_limit, settings.celery_task_soft_time_limit
    visibility = settings.celery_visibility_timeout
    if soft >= hard:
        raise ValueError(f"CELERY_TASK_SOFT_TIME_LIMIT ({soft}) must be less than CELERY_TASK_TIME_LIMIT ({hard})")
    if visibility <= hard:
        raise ValueError(
            f"CELERY_VISIBILITY_TIMEOUT ({visibility}) must be longer than CELERY_TASK_TIME_LIMIT ({hard}): "
            "otherwise Redis hands a task that is still running to a second worker"
        )
    if settings.smtp_timeout >= hard:
        raise ValueError(
            f"SMTP_TIMEOUT ({settings.smtp_timeout}) must be shorter than CELERY_TASK_TIME_LIMIT ({hard}): "
            "an email's lease lasts the time limit, and the threads pool does not enforce it"
        )
    backoff = settings.celery_retry_backoff_max
    if visibility <= hard + backoff:
        raise ValueError(
            f"CELERY_VISIBILITY_TIMEOUT ({visibility}) must be longer than CELERY_TASK_TIME_LIMIT ({hard}) "
            f"plus CELERY_RETRY_BACKOFF_MAX ({backoff}): a retried task waits, unacknowledged, in the worker "
            "that scheduled it before it runs"
        )


def configure_worker_logging(settings: Settings) -> None:
    """The worker's logging: core.logging's format, without Celery's per-task INFO lines."""
    configure_logging(settings, "worker")
    for name in CELERY_PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def unacked_restore_interval(settings: Settings) -> int:
    """Seconds between the worker's sweeps for messages whose worker died unacknowledged.

    A sweep only restores messages older than the visibility timeout, so sweeping often never
    redelivers early; it only shortens the wait after the timeout (kombu's default is 100 s).
    """
    return max(1, min(10, settings.celery_visibility_timeout // 5))


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for `settings` (checked by check_time_limits first)."""
    check_time_limits(settings)
    return {
        "broker_url": settings.celery_broker_url,
        "result_backend": settings.celery_result_backend,
        "task_default_queue": settings.celery_task_queue,
        # JSON only: a message can never make the worker unpickle code.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        # No STARTED state in the result backend: it cost two result-backend round trips per task
        # (Celery reads the stored meta before each write), and the outbox row already records when
        # each delivery started (delivery_started_at), which is what the reconciler reads.
        "task_track_started": False,
        # The soft limit raises inside the task; the hard one kills it (prefork only: the
        # threads pool cannot stop a thread, so the tasks bound their own I/O with timeouts).
        "task_soft_time_limit": settings.celery_task_soft_time_limit,
        "task_time_limit": settings.celery_task_time_limit,
        "result_expires": settings.celery_result_expires,
        # Acknowledge after the task ran, not on receipt: a worker that dies mid-task leaves
        # the message to be redelivered instead of losing it.
        "task_acks_late": True,
        # A prefork child killed mid-task (OOM, SIGKILL) requeues its message instead of failing it.
        "task_reject_on_worker_lost": True,
        # Reserve one message per slot: long tasks do not sit behind each other in one worker
        # while another idles, and a crash strands as few messages as possible.
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            # Redis redelivers an unacknowledged message after this long. It must exceed the
            # longest task (the hard limit), or a running task is handed to a second worker.
            "visibility_timeout": settings.celery_visibility_timeout,
            "unacked_restore_interval": unacked_restore_interval(settings),
            # Scan on every sweep: kombu otherwise scans on one sweep in ten.
            "unacked_restore_throttle": 1,
        },
        # Keep trying to reach the broker when the worker starts before it (compose, reboots).
        "broker_connection_retry_on_startup": True,
        # Store a finished task's result even across a short result-backend outage.
        "result_backend_always_retry": True,
        "result_backend_max_retries": RESULT_BACKEND_MAX_RETRIES,
        # On a broker connection loss the running acks_late tasks will be redelivered anyway:
        # stop them rather than run them twice (Celery 6's default; the effects are idempotent).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Task events serve only Flower and `celery events`, and cost a broker publish per state
        # change: off unless CELERY_TASK_EVENTS=true (the compose monitoring profile turns them on).
        "worker_send_task_events": settings.celery_task_events,
        # I/O-bound tasks: the asyncio pool keeps many in flight in one process (see README).
        "worker_pool": WORKER_POOLS[settings.celery_worker_pool],
        "worker_concurrency": settings.celery_worker_concurrency,
    }


def create_celery_app(settings: Settings) -> WorkerApp:
    """A Celery app for `settings`, with both tasks registered and its signal handlers connected.

    Raises ValueError on bad limits.
    """
    context = WorkerContext.from_settings(settings)
    app = WorkerApp(context)
    app.conf.update(celery_config(settings))
    register_tasks(app, context)
    observability.install(app, settings)  # metrics on WORKER_METRICS_PORT, task spans

    def configure(**_: Any) -> None:
        # Connecting this signal stops Celery from installing its own handlers: one log format
        # (core.logging, JSON by default) for the API, the relay and the worker.
        configure_worker_logging(settings)

    def close_database(**_: Any) -> None:
        context.database.close()

    # weak=False: the handlers are closures that nothing else keeps alive.
    signals.setup_logging.connect(configure, weak=False)
    signals.worker_process_shutdown.connect(close_database, weak=False)
    signals.worker_shutdown.connect(close_database, weak=False)
    return app


def __getattr__(name: str) -> Any:
    # `celery -A worker.celery_app` looks up `app`: built from the environment then, not at import.
    if name == "app":
        app = create_celery_app(get_settings())
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
