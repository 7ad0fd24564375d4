"""A results file records the tunables its run was given, and nothing secret."""

from __future__ import annotations

from bench.environment import tuned_settings


def test_a_run_records_the_numeric_and_boolean_settings_it_was_given_and_no_secret_or_url() -> None:
    environ = {
        "RELAY_BUSY_POLL": "0.003",
        "celery_worker_concurrency": "64",
        "CELERY_TASK_EVENTS": "1",
        "OTEL_SDK_DISABLED": "true",
        "DATABASE_URL": "postgresql://app:hunter2@db/app",
        "SMTP_PASSWORD": "hunter2",
        "ADMIN_API_KEY": "k" * 32,
        "CELERY_TASK_QUEUE": "transfers",
        "HOME": "/root",
    }
    assert tuned_settings(environ) == {
        "CELERY_TASK_EVENTS": "1",
        "RELAY_BUSY_POLL": "0.003",
        "celery_worker_concurrency": "64",
    }
