"""The API's engine (its connection pool). Created by the entry point, never at import time."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.settings import Settings


def create_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    """An asyncpg engine for the configured database. `overrides` go to create_async_engine.

    Every session it opens is READ COMMITTED, set explicitly rather than left to the server's
    default: the transfer locks the rows it changes (FOR UPDATE, in id order) and reads nothing
    else, so it needs no stronger level, and READ COMMITTED never fails a transfer with a
    serialization error. A statement that runs past DB_STATEMENT_TIMEOUT, or waits for a lock
    past DB_LOCK_TIMEOUT, is cancelled (the API answers 503), so one held account lock cannot
    hang every request that touches it; a request that finds no pooled connection free within
    DB_POOL_TIMEOUT fails the same way.
    """
    server_settings = {
        "default_transaction_isolation": "read committed",
        "statement_timeout": str(int(settings.db_statement_timeout * 1000)),
        "lock_timeout": str(int(settings.db_lock_timeout * 1000)),
    }
    options: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout,
        "pool_pre_ping": True,
        "connect_args": {"server_settings": server_settings},
    }
    options.update(overrides)
    return create_async_engine(settings.async_database_url, **options)
