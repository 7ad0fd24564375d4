"""Engine and session factories. Created by each process's entry point, never at import time."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from core.settings import Settings


def create_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    """An asyncpg engine for the configured database. `overrides` go to create_async_engine."""
    options: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_pre_ping": True,
    }
    options.update(overrides)
    return create_async_engine(settings.async_database_url, **options)


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
