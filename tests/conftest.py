"""Fixtures shared by every test: real servers, a fresh migrated database, settings."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from decimal import Decimal

import pytest
from alembic import command
from alembic.config import Config
from hypothesis import HealthCheck, Verbosity
from hypothesis import settings as hypothesis_settings
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from core.clients import OPERATOR, Clients, Principal, Role
from core.ledger import DepositRequest, Ledger
from core.outbox.notifier import CommitNotifier
from core.settings import Settings
from devservers.embedded import free_port
from tests.servers import postgres_server, redis_server

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = "task_runs, audit_log, outbox, idempotency_keys, transactions, accounts, clients"
# The operator's key in every test app (ADMIN_API_KEY must be at least 32 characters).
ADMIN_KEY = "test-operator-key-0123456789abcdefghijklmnopqrstuvwxyz"


def alembic_config(database_url: str) -> Config:
    config = Config(os.path.join(ROOT, "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def _async_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


async def _admin(admin_url: str, *statements: str) -> None:
    engine = create_async_engine(_async_url(admin_url), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    async with engine.connect() as connection:
        for statement in statements:
            await connection.execute(text(statement))
    await engine.dispose()


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
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    url = _async_url(make_url(admin_url).set(database=name).render_as_string(hide_password=False))
    try:
        command.upgrade(alembic_config(url), "head")
        yield url
    finally:
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


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


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a subprocess (relay, worker, API) needs to use the test servers."""
    env = dict(os.environ)
    env.update(
        DATABASE_URL=settings.libpq_database_url,
        CELERY_BROKER_URL=settings.celery_broker_url,
        CELERY_RESULT_BACKEND=settings.celery_result_backend,
        ADMIN_API_KEY=settings.admin_key or ADMIN_KEY,
        RATE_LIMIT=settings.rate_limit,
        EMAIL_SEND_DELAY=str(settings.email_send_delay),
        AUDIT_WRITE_DELAY=str(settings.audit_write_delay),
        LOG_JSON="false",
        PYTHONPATH=ROOT,
        # Processes a test starts serve no metrics unless it asks for a port: they would collide on the defaults.
        API_METRICS_PORT="0",
        RELAY_METRICS_PORT="0",
        WORKER_METRICS_PORT="0",
    )
    env.update(extra)
    return env


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(settings.async_database_url, poolclass=NullPool)
    await _truncate(engine)
    yield engine
    await engine.dispose()


async def _truncate(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))


def make_ledger(engine: AsyncEngine, settings: Settings, notify_interval: float = 0.0) -> Ledger:
    return Ledger(engine, CommitNotifier(notify_interval), max_transfer_amount=settings.max_transfer_amount)


@pytest.fixture
def ledger(engine: AsyncEngine, settings: Settings) -> Ledger:
    """The use cases on the test database (every transfer notifies)."""
    return make_ledger(engine, settings)


async def account_holder(engine: AsyncEngine, name: str = "holder") -> Principal:
    """A new client, as the ledger sees its caller."""
    created = await Clients(engine, admin_api_key=None, cache_seconds=0).create(name)
    return Principal(Role.CLIENT, created.client.id, name)


async def funded_account(
    ledger: Ledger, owner: Principal, balance: Decimal, *, currency: str = "EUR", email: str = "owner@example.com"
) -> uuid.UUID:
    """An account of `owner` holding `balance`, deposited by the operator as in production."""
    account = await ledger.open_account(owner, email, currency)
    if balance > 0:
        await ledger.deposit(DepositRequest(account.id, balance, f"fund-{uuid.uuid4()}"), OPERATOR)
    return account.id
