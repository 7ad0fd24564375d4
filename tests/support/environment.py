"""The settings and the process environment the tests give the service."""

from __future__ import annotations

import os
from pathlib import Path

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
# The operator's key in every test app (ADMIN_API_KEY must be at least 32 characters).
ADMIN_KEY = "test-operator-key-0123456789abcdefghijklmnopqrstuvwxyz"
# What a subprocess takes from the test's own environment: how to find programs and where to
# write, nothing that configures the service (a developer's DATABASE_URL or SMTP_HOST must not leak in).
_INHERITED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ")


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The whole environment of a subprocess (relay, worker, API) that uses the test servers."""
    env = {name: os.environ[name] for name in _INHERITED if name in os.environ}
    env.update(
        DATABASE_URL=settings.libpq_database_url,
        CELERY_BROKER_URL=settings.celery_broker_url,
        CELERY_RESULT_BACKEND=settings.celery_result_backend,
        ADMIN_API_KEY=settings.admin_key or ADMIN_KEY,
        RATE_LIMIT=settings.rate_limit,
        EMAIL_SEND_DELAY=str(settings.email_send_delay),
        AUDIT_WRITE_DELAY=str(settings.audit_write_delay),
        LOG_JSON="false",
        PYTHONPATH=str(ROOT),
        # Processes a test starts serve no metrics unless it asks for a port: they would collide on the defaults.
        API_METRICS_PORT="0",
        RELAY_METRICS_PORT="0",
        WORKER_METRICS_PORT="0",
    )
    env.update(extra)
    return env
