"""The API's engine (its connection pool). Created by the entry point, never at import time."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

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
