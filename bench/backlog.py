"""Outbox rows for the relay scenarios, written the way transfers write them."""

from __future__ import annotations

import asyncpg

PAYLOAD = '{"email": "bench@example.com", "amount": "1.00", "status": "SUCCESS"}'


async def fill_backlog(database_url: str, rows: int, *, task_name: str = "send_transaction_email") -> None:
    """Commit `rows` pending outbox rows in ONE transaction, so a relay sees the whole backlog at once."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("TRUNCATE outbox, task_runs, audit_log")
        chunk = 100_000
        async with connection.transaction():
            for start in range(0, rows, chunk):
                await connection.execute(
                    "INSERT INTO outbox (id, task_name, kwargs) "
                    "SELECT gen_random_uuid(), $1, $2::jsonb FROM generate_series(1, $3)",
                    task_name,
                    PAYLOAD,
                    min(chunk, rows - start),
                )
        await connection.execute("ANALYZE outbox")
    finally:
        await connection.close()


async def count_by_state(database_url: str) -> dict[str, int]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT state, count(*) AS n FROM outbox GROUP BY state")
    finally:
        await connection.close()
    return {row["state"]: row["n"] for row in rows}
