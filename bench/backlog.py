"""Outbox rows for the relay scenarios, written the way transfers write them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from core.outbox import queries

T = TypeVar("T")
PAYLOAD = '{"email": "bench@example.com", "amount": "1.00", "status": "SUCCESS"}'


async def fill_backlog(
    database_url: str, rows: int, *, task_name: str = "send_transaction_email", due_in: float = 0.0, due_now: int = 0
) -> None:
    """Commit `rows` pending outbox rows in ONE transaction, so a relay sees the whole backlog at once.

    With `due_in`, the rows fall due that many seconds from now (rows waiting in backoff), and
    `due_now` more rows are due at once.
    """
    connection = await asyncpg.connect(database_url)
    try:
        await queries.clear(connection)
        chunk = 100_000
        async with connection.transaction():
            for start in range(0, rows, chunk):
                await queries.fill(connection, task_name, PAYLOAD, min(chunk, rows - start), due_in)
            if due_now:
                await queries.fill(connection, task_name, PAYLOAD, due_now)
        await queries.analyze(connection)
    finally:
        await connection.close()


async def on_database(database_url: str, query: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run one of core.outbox.queries on a connection of its own."""
    connection = await asyncpg.connect(database_url)
    try:
        return await query(connection, *args)
    finally:
        await connection.close()


async def count_by_state(database_url: str) -> dict[str, int]:
    return await on_database(database_url, queries.state_counts)
