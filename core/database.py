"""Engine and session factories. Created by each process's entry point, never at import time."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import AdaptedConnection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.settings import Settings

# Bounds on waiting for the database, so a request fails fast (503) when it is unreachable
# instead of hanging: asyncpg waits 60 s to connect by default, SQLAlchemy 30 s for a pooled
# connection. Overrides (the worker's engine_options) may set their own.
CONNECT_TIMEOUT = 2.0  # seconds to open a connection, TCP and start-up
POOL_TIMEOUT = 2.0  # seconds to wait for a free pooled connection when all are in use


def create_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    """An asyncpg engine for the configured database. `overrides` go to create_async_engine
    (`connect_args` are merged into the defaults).

    Its pool never hands out a connection that the driver already knows is closed (see
    `discard_closed_connection`), with or without pre-ping.
    """
    connect_args = {"timeout": CONNECT_TIMEOUT, **overrides.pop("connect_args", {})}
    options: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": POOL_TIMEOUT,
        "pool_pre_ping": True,
        "connect_args": connect_args,
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
