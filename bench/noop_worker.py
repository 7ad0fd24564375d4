"""A Celery app with the worker's own configuration and one task that does nothing.

`celery -A bench.noop_worker worker` is the yardstick of bench/worker_cost.py: what Celery
itself costs per task with this project's settings and logging, against which the real tasks are
measured.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from core.settings import get_settings
from worker.celery_app import celery_config, configure_worker_logging

NOOP = "bench.noop"

settings = get_settings()
app = Celery("bench_noop")
app.conf.update(celery_config(settings))


@signals.setup_logging.connect
def _logging(**_: Any) -> None:
    """The worker's own logging (which leaves out Celery's per-task lines), so both log the same way."""
    configure_worker_logging(settings)


@app.task(name=NOOP)
def noop(**kwargs: Any) -> dict[str, bool]:
    """Returns a result like the real tasks do, so the result backend costs the same."""
    return {"success": True}
