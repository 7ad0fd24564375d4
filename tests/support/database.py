"""The test database: creating and migrating it, reading it, and the ledger's callers on it."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
from alembic.config import Config
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from core.clients import OPERATOR, Clients, Principal, Role
from core.ledger import DepositRequest, Ledger
from core.outbox.notifier import CommitNotifier
from core.settings import Settings
from tests.support.environment import ROOT

# Every table the service writes, in an order TRUNCATE ... CASCADE accepts.
TABLES = "task_runs, audit_log, outbox, idempotency_keys, transactions, accounts, clients"
Database = AsyncEngine | str  # an engine, or a URL with or without the +asyncpg driver


def alembic_config(database_url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def async_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def libpq_url(database: Database) -> str:
    url = database.url if isinstance(database, AsyncEngine) else make_url(database)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def run_admin(admin_url: str, *statements: str) -> None:
    """Run statements outside a transaction (CREATE/DROP DATABASE) on the server's admin database."""
    engine = create_async_engine(async_url(admin_url), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    async with engine.connect() as connection:
        for statement in statements:
            await connection.execute(text(statement))
    await engine.dispose()


async def fetch(database: Database, sql: str, *args: Any) -> list[asyncpg.Record]:
    """The rows of one statement, on a connection of its own."""
    connection = await asyncpg.connect(libpq_url(database))
    try:
        return await connection.fetch(sql, *args)
    finally:
        await connection.close()


def select(database: Database, sql: str, *args: Any) -> list[asyncpg.Record]:
    """fetch() for tests that run no event loop (the e2e tests)."""
    return asyncio.run(fetch(database, sql, *args))


async def truncate(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))


def make_ledger(engine: AsyncEngine, settings: Settings, notify_interval: float = 0.0) -> Ledger:
    return Ledger(engine, CommitNotifier(notify_interval), max_transfer_amount=settings.max_transfer_amount)


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
