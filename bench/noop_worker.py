"""A Celery app with the worker's own configuration and one task that does nothing.

`celery -A bench.noop_worker worker` is the yardstick of bench/worker_cost.py: what Celery
itself costs per task with this project's settings, against which the real tasks are measured.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from core.settings import get_settings
from worker.celery_app import celery_config

NOOP = "bench.noop"

app = Celery("bench_noop")
app.conf.update(celery_config(get_settings()))


@app.task(name=NOOP)
def noop(**kwargs: Any) -> dict[str, bool]:
    """Returns a result like the real tasks do, so the result backend costs the same."""
    return {"success": True}
