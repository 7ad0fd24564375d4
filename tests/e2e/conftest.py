from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from core.settings import Settings
from tests.support.environment import service_env
from tests.support.relays import private_redis
from tests.support.smtp import smtp_sink
from tests.support.system import E2E_ENV, System


@pytest.fixture
def system_env() -> dict[str, str]:
    """Overrides of E2E_ENV for one test (parametrize or override this fixture)."""
    return {}


@pytest.fixture
def smtp_reply_delay() -> float:
    """Seconds the SMTP sink holds each reply (override to make sends slow)."""
    return 0.0


@pytest.fixture
def system(
    settings: Settings, engine: AsyncEngine, tmp_path: Path, system_env: dict[str, str], smtp_reply_delay: float
) -> Iterator[System]:
    with private_redis() as redis, smtp_sink(reply_delay=smtp_reply_delay) as smtp:
        servers = {
            "CELERY_BROKER_URL": redis.url,
            "CELERY_RESULT_BACKEND": redis.url,
            "SMTP_HOST": smtp.host,
            "SMTP_PORT": str(smtp.port),
        }
        env = service_env(settings, **{**servers, **E2E_ENV, **system_env})
        running = System(env, redis, smtp, tmp_path)
        try:
            running.start_all()
            yield running
        finally:
            running.stop_all()
            print(running.logs())  # shown by pytest only when the test failed
