"""Fixtures shared by every test: real servers, a fresh migrated database, settings."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from types import FrameType

import pytest
from alembic import command
from hypothesis import HealthCheck, Verbosity
from hypothesis import settings as hypothesis_settings
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from core.ledger import Ledger
from core.settings import Settings
from devservers.embedded import free_port
from tests.support.database import alembic_config, async_url, make_ledger, run_admin, truncate
from tests.support.environment import ADMIN_KEY
from tests.support.servers import postgres_server, redis_server

# pgserver logs from an atexit hook, after pytest has closed the streams it captured.
logging.getLogger("pgserver").setLevel(logging.WARNING)

# CI: no deadline on a loaded machine, the same examples on every run (a failure reproduces with
# the same command), and the failing example's blob printed for @reproduce_failure.
hypothesis_settings.register_profile(
    "ci", deadline=None, derandomize=True, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
# A developer's run: random examples, remembered in .hypothesis/ so a failure comes back first.
hypothesis_settings.register_profile(
    "dev", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.register_profile(
    "debug", parent=hypothesis_settings.get_profile("dev"), verbosity=Verbosity.verbose
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (a CI timeout, `kill`) ends the session as Ctrl-C does, so the fixtures still stop
    # what they started: the service's processes run in sessions of their own and would outlive it.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[str, str]]:
    """(PostgreSQL admin URL, Redis URL) for the whole test session."""
    with ExitStack() as stack, postgres_server(stack) as pg_url, redis_server(stack) as redis_url:
        yield pg_url, redis_url


@pytest.fixture(scope="session")
def database_url(servers: tuple[str, str]) -> Iterator[str]:
    """A fresh database for this test session, migrated to head, dropped at the end."""
    admin_url = servers[0]
    name = f"test_{uuid.uuid4().hex[:12]}"
    asyncio.run(run_admin(admin_url, f'CREATE DATABASE "{name}"'))
    url = async_url(make_url(admin_url).set(database=name).render_as_string(hide_password=False))
    try:
        command.upgrade(alembic_config(url), "head")
        yield url
    finally:
        asyncio.run(run_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_url(servers: tuple[str, str]) -> str:
    """This session's own Redis (tests/servers.py): nobody else flushes it, consumes from it or re-queues on it."""
    return servers[1]


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    """Settings pointing at the test servers, with the tasks' simulated delays off."""
    return Settings(
        _env_file=None,
        database_url=database_url,
        celery_broker_url_override=redis_url,
        celery_result_backend_override=redis_url,
        email_send_delay=0,
        audit_write_delay=0,
        log_json=False,
        # The in-process API serves its metrics, as in production, on a port of its own.
        api_metrics_port=free_port(),
        admin_api_key=ADMIN_KEY,
        # Tests send bursts; the rate-limit tests set their own limit.
        rate_limit="100000/second",
    )


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(settings.async_database_url, poolclass=NullPool)
    await truncate(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def ledger(engine: AsyncEngine, settings: Settings) -> Ledger:
    """The use cases on the test database (every transfer notifies)."""
    return make_ledger(engine, settings)
