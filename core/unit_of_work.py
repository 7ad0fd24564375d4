"""One explicit unit of work per use case: leaving the block without commit() rolls back."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from core.logging import describe
from core.transient import CONNECTION_ERRORS


class ConnectionUnusable(ConnectionError):
    """The pooled connection broke: it could not start the transaction, or the driver's state
    became inconsistent in the middle of it. It has been discarded; the next unit of work gets
    another connection. Nothing was committed, unless it broke during commit() itself."""


class DriverUnitOfWork:
    """A unit of work on the driver's own connection (asyncpg), taken from the engine's pool.

    For the transfer, the hot path: SQLAlchemy's execution layer cost more CPU per transfer
    than the SQL itself, so its statements go straight to asyncpg, inside one explicit
    transaction. Usage: ``async with DriverUnitOfWork(engine) as uow: ...; await uow.commit()``;
    leaving the block without commit() rolls back.

    A connection that breaks is invalidated (closed and replaced in the pool), never handed
    out again; the driver's connection errors propagate, others that mean a broken connection
    become ConnectionUnusable.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pooled: PoolProxiedConnection | None = None
        self._transaction: Any = None
        self._connection: asyncpg.Connection | None = None

    @property
    def connection(self) -> asyncpg.Connection:
        if self._connection is None:
            raise RuntimeError("DriverUnitOfWork used outside its 'async with' block")
        return self._connection

    async def __aenter__(self) -> Self:
        pooled = self._pooled = await _checkout(self._engine)
        try:
            self._connection = pooled.driver_connection
            self._transaction = self.connection.transaction()
            await self._transaction.start()
        except BaseException as exc:
            self._pooled = self._transaction = self._connection = None
            # BEGIN failed: the server dropped the connection before the driver saw it close,
            # or BEGIN was cut off half-way (cancelled) and the driver's state is unknown.
            # Either way it must not go back to the pool, where the next request would fail
            # on it too.
            await greenlet_spawn(_release, pooled, True)
            if isinstance(exc, Exception):
                raise ConnectionUnusable(f"could not start a transaction: {describe(exc)}") from exc
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pooled, transaction = self._pooled, self._transaction
        self._pooled = self._transaction = self._connection = None
        broken = isinstance(exc, CONNECTION_ERRORS)
        try:
            if transaction is not None and not broken:
                await transaction.rollback()
        except CONNECTION_ERRORS:
            broken = True
            if exc is None:
                raise
            # The connection broke under the failing block: its error is the one to report.
        finally:
            if pooled is not None:
                # SQLAlchemy never saw the driver's error, so a broken connection is discarded
                # here instead of handed to the next request.
                await greenlet_spawn(_release, pooled, broken)
        if isinstance(exc, asyncpg.InternalClientError):
            raise ConnectionUnusable(f"the connection broke: {describe(exc)}") from exc

    async def commit(self) -> None:
        await self._transaction.commit()
        self._transaction = None


async def _checkout(engine: AsyncEngine) -> PoolProxiedConnection:
    """A connection from the engine's pool, as the pool's own proxy: no SQLAlchemy Connection
    around it (its construction, events and teardown cost more than the checkout itself).

    Errors come as engine.connect() raises them: the driver's, wrapped in SQLAlchemy's DBAPIError
    family (so a database that refuses the connection is still "unavailable", not a bug).
    """
    try:
        return await engine.raw_connection()
    except engine.dialect.loaded_dbapi.Error as exc:
        raise sa_exc.DBAPIError.instance(None, None, exc, engine.dialect.loaded_dbapi.Error) from exc


def _release(pooled: PoolProxiedConnection, broken: bool) -> None:
    """Give the connection back to the pool; a broken one is closed and forgotten instead (the
    pool opens a fresh one). Runs in greenlet_spawn: the pool may wait on the driver."""
    if broken:
        pooled.invalidate()
    pooled.close()
