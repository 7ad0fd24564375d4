"""The migrations build exactly the models, and undo cleanly."""

from __future__ import annotations

import asyncio
import uuid

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, make_url, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from core.models import OUTBOX_STORAGE, Base
from tests.support.database import alembic_config, async_url, run_admin


def _diff_and_tables(url: str) -> tuple[list[object], set[str]]:
    async def inspect_db() -> tuple[list[object], set[str]]:
        engine = create_async_engine(url, poolclass=NullPool)
        async with engine.connect() as connection:
            diff = await connection.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )
            tables = await connection.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        await engine.dispose()
        return diff, tables

    return asyncio.run(inspect_db())


def test_upgrade_matches_models_and_downgrade_removes_everything(servers: tuple[str, str]) -> None:
    admin = servers[0]
    name = f"migr_{uuid.uuid4().hex[:10]}"
    asyncio.run(run_admin(admin, f'CREATE DATABASE "{name}"'))
    url = async_url(make_url(admin).set(database=name).render_as_string(hide_password=False))
    try:
        config = alembic_config(url)
        command.upgrade(config, "head")
        diff, tables = _diff_and_tables(url)
        assert diff == []
        assert {"accounts", "transactions", "outbox", "audit_log", "task_runs"} <= tables

        command.downgrade(config, "base")
        _, tables = _diff_and_tables(url)
        assert tables == {"alembic_version"}

        command.upgrade(config, "head")
    finally:
        asyncio.run(run_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_the_outbox_is_vacuumed_after_a_bounded_number_of_changed_rows(servers: tuple[str, str]) -> None:
    admin = servers[0]
    name = f"migr_{uuid.uuid4().hex[:10]}"
    asyncio.run(run_admin(admin, f'CREATE DATABASE "{name}"'))
    url = async_url(make_url(admin).set(database=name).render_as_string(hide_password=False))

    async def outbox_options() -> dict[str, str]:
        engine = create_async_engine(url, poolclass=NullPool)
        async with engine.connect() as connection:
            query = text("SELECT reloptions FROM pg_class WHERE relname = 'outbox'")
            options = (await connection.execute(query)).scalar()
        await engine.dispose()
        return dict(option.split("=", 1) for option in options or [])

    try:
        config = alembic_config(url)
        command.upgrade(config, "0004")
        assert asyncio.run(outbox_options()) == {}  # PostgreSQL's defaults: a vacuum at 20% dead
        command.upgrade(config, "head")
        assert asyncio.run(outbox_options()) == OUTBOX_STORAGE
        command.downgrade(config, "0004")
        assert asyncio.run(outbox_options()) == {}
    finally:
        asyncio.run(run_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
