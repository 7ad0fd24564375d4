"""One explicit unit of work per use case: leaving the block without commit() rolls back."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.transient import CONNECTION_ERRORS


class DriverUnitOfWork:
    """A unit of work on the driver's own connection (asyncpg), taken from the engine's pool.

    For the transfer, the hot path: SQLAlchemy's execution layer cost more CPU per transfer
    than the SQL itself, so its statements go straight to asyncpg, inside one explicit
    transaction. Usage: ``async with DriverUnitOfWork(engine) as uow: ...; await uow.commit()``;
    leaving the block without commit() rolls back.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pooled: AsyncConnection | None = None
        self._transaction: Any = None
        self._connection: asyncpg.Connection | None = None

    @property
    def connection(self) -> asyncpg.Connection:
        if self._connection is None:
            raise RuntimeError("DriverUnitOfWork used outside its 'async with' block")
        return self._connection

    async def __aenter__(self) -> Self:
        self._pooled = await self._engine.connect()
        try:
            raw = await self._pooled.get_raw_connection()
            self._connection = raw.driver_connection
            self._transaction = self.connection.transaction()
            await self._transaction.start()
        except BaseException:
            await self._pooled.close()
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
                if broken:
                    # SQLAlchemy never saw this error (it came from the driver), so tell the
                    # pool: the connection is discarded instead of handed to the next request.
                    await pooled.invalidate()
                await pooled.close()

    async def commit(self) -> None:
        await self._transaction.commit()
        self._transaction = None
