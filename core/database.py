"""Engine and session factories. Created by each process's entry point, never at import time."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import AdaptedConnection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.settings import Settings

# A bound on connecting, so a request fails fast (503) when the database is unreachable instead
# of hanging (asyncpg waits 60 s by default). The wait for a pooled connection is DB_POOL_TIMEOUT.
CONNECT_TIMEOUT = 2.0  # seconds to open a connection, TCP and start-up


def create_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    """An asyncpg engine for the configured database. `overrides` go to create_async_engine
    (`connect_args`, and their `server_settings`, are merged into the defaults).

    Its pool never hands out a connection that the driver already knows is closed (see
    `discard_closed_connection`), with or without pre-ping.

    Every session it opens is READ COMMITTED, set explicitly rather than left to the server's
    default: the transfer locks the rows it changes (FOR UPDATE, in id order) and reads nothing
    else, so it needs no stronger level, and READ COMMITTED never fails a transfer with a
    serialization error. A statement that runs past DB_STATEMENT_TIMEOUT, or waits for a lock
    past DB_LOCK_TIMEOUT, is cancelled (the API answers 503), so one held account lock cannot
    hang every request that touches it; a request that finds no pooled connection free within
    DB_POOL_TIMEOUT fails the same way.
    """
    extra = dict(overrides.pop("connect_args", {}))
    server_settings = {
        "default_transaction_isolation": "read committed",
        "statement_timeout": str(int(settings.db_statement_timeout * 1000)),
        "lock_timeout": str(int(settings.db_lock_timeout * 1000)),
        **extra.pop("server_settings", {}),
    }
    options: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout,
        "pool_pre_ping": True,
        "connect_args": {"timeout": CONNECT_TIMEOUT, "server_settings": server_settings, **extra},
    }
    options.update(overrides)
    engine = create_async_engine(settings.async_database_url, **options)
    event.listen(engine.sync_engine.pool, "checkout", discard_closed_connection)
    return engine


def discard_closed_connection(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    """Pool "checkout" hook: refuse a pooled connection whose socket the server has closed.

    A database restart, a failover or `pg_terminate_backend` makes the server send FATAL and
    close every session's socket. asyncpg reads that on its event loop as soon as it happens
    and marks the connection closed, but the pool (without pre-ping) would still hand it out,
    and the request would fail with "connection is closed". Raising DisconnectionError here
    makes SQLAlchemy discard the connection and open a fresh one for this same checkout.
    `is_closed()` is a flag test: no round trip.
    """
    if isinstance(dbapi_connection, AdaptedConnection) and dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server closed this pooled connection")
